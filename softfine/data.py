"""Readers: every dataset becomes a list of sentences of characters with BIOES tags.

Tags are `O` or `<seg>-<category>` with seg in B/I/E/S; the category is kept as written in the
source (`PER.NAM`, `NAME`, `/organization/company/vehicle_brand`). Splitting a category into its
hierarchy levels is the label space's job (labels.py), not the readers'.

Problem policy, the same for every reader:
- a missing or empty file, or one that is not UTF-8, is always an error (DataError);
- tags that are not valid in the file's scheme are read the way conlleval, the CoNLL evaluation
  script, reads them (seqeval's `get_entities`, its default mode): an I-X or E-X that continues no
  X chunk starts one, and an entity still open at the end of a sentence ends there. The sentence
  is kept, repaired, with a warning naming file and line;
- a sentence that cannot be read (a line without a tag, an unknown tag prefix, an empty category,
  an empty text, a span outside the text or not matching its mention, overlapping spans, a record
  without labels) is never kept with a guessed label. `on_problem` says what happens to it:
  "skip" drops it with a warning (training splits), "refuse" makes it an error (dev and test: an
  evaluation never scores fewer sentences than its split has), "error" (`--strict`) makes every
  problem an error, repairs included.

Users' own files (formats.py) are read by these readers too; their tagging scheme is detected
from the tags (`detect_scheme`) unless given, and a token of several characters is split into
its characters, its tag carried over as BIO carries an entity (`split_tokens`).

Line numbers count "\n" only, whatever Unicode line separators the text holds. A line may end in
"\r\n"; a lone "\r" in a one-character-per-line file makes its sentence unreadable (it would
otherwise be read as part of a character).
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

log = logging.getLogger(__name__)

SEGMENTS = ("B", "I", "E", "S")
_PREFIXES = {
    "bio": {"B": "B", "I": "I"},
    "bioes": {"B": "B", "I": "I", "E": "E", "S": "S"},
    "bmes": {"B": "B", "M": "I", "E": "E", "S": "S"},
}
SCHEMES = tuple(_PREFIXES)
ON_PROBLEM = ("skip", "refuse", "error")


@dataclass(frozen=True)
class Sentence:
    chars: tuple[str, ...]
    tags: tuple[str, ...]
    source: str  # "file:line" (or "file:line (id N)") of the sentence, for messages

    def __len__(self) -> int:
        return len(self.chars)


class SentenceProblem(ValueError):
    """A problem that disqualifies one sentence; the reader adds file and line.

    `index` is the 0-based position (character or line) in the sentence where it was found.
    """

    def __init__(self, message: str, index: int = 0):
        super().__init__(message)
        self.index = index


def _render(chunks: list[tuple[str, int, int]], length: int, scheme: str) -> list[str]:
    """Tags of the given (category, start, end) chunks, written in BIO or BIOES."""
    tags = ["O"] * length
    for category, start, end in chunks:
        for i in range(start, end + 1):
            tags[i] = f"I-{category}"
        if scheme == "bio" or start < end:
            tags[start] = f"B-{category}"
        if scheme != "bio":
            tags[end] = f"E-{category}" if start < end else f"S-{category}"
    return tags


def to_bioes(tags: Sequence[str], scheme: str) -> tuple[list[str], SentenceProblem | None]:
    """(BIOES tags, repair note) of a tag sequence in `scheme` (bio, bioes, bmes).

    Chunks are read as conlleval reads them; the note (None when the tags were valid) names the
    first tag that was not valid in its scheme. An unknown tag prefix raises SentenceProblem.
    """
    from seqeval.metrics.sequence_labeling import get_entities

    prefixes = _PREFIXES[scheme]
    mapped = []
    for i, tag in enumerate(tags):
        seg, sep, category = tag.partition("-")
        if tag != "O" and (not sep or seg not in prefixes or not category.strip()):
            known = "/".join(prefixes)
            raise SentenceProblem(
                f"tag {tag!r} at character {i + 1}: unknown tag prefix or empty category "
                f"(expected O or {known}-CATEGORY for {scheme.upper()})",
                i,
            )
        mapped.append("O" if tag == "O" else f"{prefixes[seg]}-{category}")
    chunks = get_entities(mapped)
    canonical = "bio" if scheme == "bio" else "bioes"
    written = _render(chunks, len(mapped), canonical)
    note = None
    if written != mapped:
        i = next(i for i, (a, b) in enumerate(zip(written, mapped)) if a != b)
        chunk = next((f"part of {c} at characters {s + 1}-{e + 1}" for c, s, e in chunks if s <= i <= e), "O")
        note = SentenceProblem(
            f"tag {tags[i]!r} at character {i + 1} is not valid {scheme.upper()}; read as "
            f"conlleval does: {chunk}",
            i,
        )
    return _render(chunks, len(mapped), "bioes"), note


class _Problems:
    """Applies the module's problem policy (see the docstring) and counts what it did."""

    def __init__(self, path: Path, on_problem: str):
        if on_problem not in ON_PROBLEM:
            raise ValueError(f"on_problem must be one of {ON_PROBLEM}, got {on_problem!r}")
        self.path, self.on_problem = path, on_problem
        self.skipped = self.repaired = 0

    def unreadable(self, line: int, message: str) -> None:
        """A sentence that cannot be read: skipped, or an error."""
        where = f"{self.path}:{line}: {message}"
        if self.on_problem != "skip":
            hint = (
                "" if self.on_problem == "error" else " (an evaluation split is scored whole: fix the file)"
            )
            raise DataError(where + hint)
        self.skipped += 1
        log.warning("%s (sentence skipped)", where)

    def repaired_tags(self, line: int, message: str) -> None:
        where = f"{self.path}:{line}: {message}"
        if self.on_problem == "error":
            raise DataError(where)
        self.repaired += 1
        log.warning("%s (sentence kept)", where)

    def summary(self, total: int) -> None:
        if self.repaired:
            log.warning(
                "%s: read %d of %d sentences with invalid tags as conlleval does (see warnings "
                "above; --strict makes them errors)",
                self.path,
                self.repaired,
                total,
            )
        if self.skipped:
            log.warning(
                "%s: skipped %d of %d sentences that cannot be read (see warnings above; "
                "--strict makes them errors)",
                self.path,
                self.skipped,
                total,
            )


def _lines(path: Path) -> list[str]:
    """The file's lines, split on "\n" only (not on a lone "\r", U+2028 and the other separators
    that str.splitlines and text mode honour), so that line numbers are those of an editor; the
    "\r" of a "\r\n" line end is dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": no "\r" read as a line end
            text = f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if "\ufeff" in text:  # a byte-order mark past the start (files joined with cat) would become a character
        line = text.count("\n", 0, text.index("\ufeff")) + 1
        raise DataError(
            f"{path}:{line}: a byte-order mark (U+FEFF) inside the file, where it would be read as a "
            "character; remove it (one at the very start is allowed)"
        )
    return [line.removesuffix("\r") for line in text.split("\n")]


def _blocks(lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """Blank-line separated blocks, with the 1-based line number of each block's first line."""
    block: list[str] = []
    start = 0
    for number, line in enumerate(lines, 1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield start, block
            block = []
    if block:
        yield start, block


_WEIBO_CHAR = re.compile(r"(.+?)(\d+)")


def read_columns(
    path: str | Path,
    *,
    scheme: str | None = "bioes",
    delimiter: str | None = None,
    strip_position_digits: bool = False,
    words: bool = False,
    on_problem: str = "skip",
) -> list[Sentence]:
    """Read a one-character-per-line file: `CHAR<delimiter>TAG`, blank lines between sentences.

    `scheme` is the tagging scheme of the file (bio, bioes or bmes; None: detected from its tags);
    tags are returned in BIOES. With a `delimiter` every line has exactly two columns;
    `delimiter=None` splits on whitespace and takes the first and last columns (CoNLL-style files
    with more). With `strip_position_digits`, the word-position digits that Weibo appends to each
    character are removed (`科0` -> `科`). With `words`, a first column of several characters is
    split into characters (`split_tokens`).
    """
    if scheme is not None and scheme not in _PREFIXES:
        raise ValueError(f"unknown tagging scheme {scheme!r}; expected one of {sorted(_PREFIXES)}")
    path = Path(path)
    problems = _Problems(path, on_problem)
    read = []  # (first line, its tokens, their tags)
    for start, block in _blocks(_lines(path)):
        try:
            read.append((start, *_columns(block, delimiter, strip_position_digits)))
        except SentenceProblem as problem:  # index: the line (= character) within the sentence
            problems.unreadable(start + problem.index, str(problem))
    scheme = scheme or detect_scheme((tag for _, _, tags in read for tag in tags), path)
    sentences = []
    for start, tokens, tags in read:
        owner = list(range(len(tokens)))  # the line (within the sentence) of each character
        try:
            if words:
                tokens, tags, owner = split_tokens(tokens, tags, scheme)
            bioes, repair = to_bioes(tags, scheme)
        except SentenceProblem as problem:
            problems.unreadable(start + owner[min(problem.index, len(owner) - 1)], str(problem))
            continue
        if repair is not None:
            problems.repaired_tags(start + owner[repair.index], str(repair))
        sentences.append(Sentence(tuple(tokens), tuple(bioes), f"{path}:{start}"))
    problems.summary(len(sentences) + problems.skipped)
    return sentences


def _columns(
    block: list[str], delimiter: str | None, strip_position_digits: bool
) -> tuple[list[str], list[str]]:
    chars, tags = [], []
    for offset, line in enumerate(block):
        if "\r" in line:  # "\r\n" endings are gone (_lines): a lone one would end up inside a character
            raise SentenceProblem(
                f"carriage return (\\r) inside line {line!r}: the file has old Mac line endings "
                "or a stray control character; use \\n or \\r\\n line endings",
                offset,
            )
        fields = line.split(delimiter)
        if delimiter is None and len(fields) > 2:
            fields = [fields[0], fields[-1]]
        if len(fields) != 2 or not fields[0] or not fields[1].strip():
            sep = "whitespace" if delimiter is None else repr(delimiter)
            raise SentenceProblem(f"malformed line {line!r}: expected CHAR, {sep}, TAG", offset)
        char, tag = fields[0], fields[1].strip()
        if strip_position_digits:
            match = _WEIBO_CHAR.fullmatch(char)
            if not match:
                raise SentenceProblem(
                    f"malformed character {char!r}: expected a character "
                    "followed by its word-position digits",
                    offset,
                )
            char = match.group(1)
        chars.append(char)
        tags.append(tag)
    return chars, tags


def detect_scheme(tags: Iterable[str], path: str | Path) -> str:
    """The tagging scheme of a file's tags: bmes where an M- prefix occurs, bioes where an E- or
    S- one does, else bio. A file that mixes M- and I- is no scheme: a DataError asks for
    --tag-scheme."""
    prefixes = {tag.partition("-")[0] for tag in tags if tag != "O"}
    if {"M", "I"} <= prefixes:
        raise DataError(
            f"{path}: its tags have both M- and I- prefixes, which is none of BIO, BIOES and BMES; "
            "give --tag-scheme bio, bioes or bmes"
        )
    if "M" in prefixes:
        return "bmes"
    return "bioes" if prefixes & {"E", "S"} else "bio"


def split_tokens(
    tokens: Sequence[str], tags: Sequence[str], scheme: str
) -> tuple[list[str], list[str], list[int]]:
    """(characters, their tags, the token of each character): a token of several characters split
    into characters, its tag carried over as BIO carries an entity: B-X -> B-X I-X ..., I-X -> I-X
    I-X ..., E-X -> I-X ... E-X, S-X -> B-X I-X ... E-X (M- for I- in BMES), O -> O O ... A token of
    one character is kept whatever it is (a space too, as span JSON's text keeps it); an empty token,
    or one of several characters that holds whitespace, is refused: whether its spaces are characters
    of the text (and of the entity) is not said."""
    inside = "M" if scheme == "bmes" else "I"
    chars, char_tags, owner = [], [], []
    for i, (token, tag) in enumerate(zip(tokens, tags)):
        if not token or (len(token) > 1 and any(c.isspace() for c in token)):
            raise SentenceProblem(
                f"token {i + 1} {token!r} is empty or holds whitespace among other characters: "
                "give each space as a token of its own, or leave it out",
                i,
            )
        seg, _, category = tag.partition("-")
        n = len(token)
        if n == 1 or tag == "O" or seg not in ("B", "I", "M", "E", "S"):
            segs = [seg] * n
        elif seg == "B":
            segs = ["B"] + [inside] * (n - 1)
        elif seg == "E":
            segs = [inside] * (n - 1) + ["E"]
        elif seg == "S":
            segs = ["B"] + [inside] * (n - 2) + ["E"]
        else:
            segs = [seg] * n
        chars.extend(token)
        char_tags.extend(tag if tag == "O" or n == 1 else f"{s}-{category}" for s in segs)
        owner.extend([i] * n)
    return chars, char_tags, owner


def read_weibo(path: str | Path, on_problem: str = "skip") -> list[Sentence]:
    """Weibo NER: `CHAR<TAB>TAG`, BIO, each character followed by its word-position digits."""
    return read_columns(path, scheme="bio", delimiter="\t", strip_position_digits=True, on_problem=on_problem)


def read_bmes(path: str | Path, on_problem: str = "skip") -> list[Sentence]:
    """Resume and OntoNotes 4.0 (the usual Chinese NER release): `CHAR<SPACE>TAG`, BMES."""
    return read_columns(path, scheme="bmes", delimiter=" ", on_problem=on_problem)


def read_fine(path: str | Path, on_problem: str = "skip") -> list[Sentence]:
    """FiNE: JSON lines `{"id", "text", "label": {CATEGORY: {MENTION: [[start, end], ...]}}}`.

    Offsets are characters, `end` inclusive; CATEGORY is a path such as `/person/entertainment`.
    A mention matches its span after Unicode NFKC normalisation of both (the files write some
    spaces as U+00A0 in the mention and as U+0020 in the text).
    """
    path = Path(path)
    problems = _Problems(path, on_problem)
    sentences = []
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        record = None
        try:
            record = _fine_record(line)
            tags = _fine_tags(record["text"], record["label"])
        except SentenceProblem as problem:
            sid = f"id {record.get('id')}: " if record else ""
            problems.unreadable(number, sid + str(problem))
            continue
        where = f"{path}:{number} (id {record.get('id')})"
        sentences.append(Sentence(tuple(record["text"]), tuple(tags), where))
    problems.summary(len(sentences) + problems.skipped)
    return sentences


def _json_object(line: str) -> dict:
    """One JSON-lines record: an object, or the SentenceProblem that says what the line is."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise SentenceProblem(f"not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise SentenceProblem(f"expected a JSON object, got {type(record).__name__}")
    return record


def _fine_record(line: str) -> dict:
    record = _json_object(line)
    if not isinstance(record.get("text"), str) or not record["text"]:
        raise SentenceProblem(f'id {record.get("id")}: expected a non-empty "text" string')
    if not isinstance(record.get("label"), dict):
        got = 'no "label"' if "label" not in record else f'"label" {json.dumps(record["label"])[:40]}'
        raise SentenceProblem(
            f"id {record.get('id')}: {got}: expected an object "
            f"{{CATEGORY: {{MENTION: [[start, end], ...]}}}} "
            "({} for a sentence without entities)"
        )
    return record


def _fine_spans(labels: dict) -> Iterator[tuple[str, str, int, int]]:
    """(category, mention, start, end) of a FiNE "label" field, checking its shape."""
    try:
        for category, mentions in labels.items():
            if not category.strip("/ "):
                raise SentenceProblem(f"empty category {category!r}")
            for mention, spans in mentions.items():
                for start, end in spans:
                    if not (type(start) is int and type(end) is int):
                        raise TypeError
                    yield category, mention, start, end
    except SentenceProblem:
        raise
    except (AttributeError, TypeError, ValueError):
        raise SentenceProblem(
            'malformed "label": expected {CATEGORY: {MENTION: [[start, end], ...]}}'
        ) from None


def _fine_tags(text: str, labels: dict) -> list[str]:
    """BIOES tags of a FiNE record."""
    nfkc = lambda s: unicodedata.normalize("NFKC", s)  # noqa: E731
    tags = ["O"] * len(text)
    for category, mention, start, end in _fine_spans(labels):
        if not (0 <= start <= end < len(text)):
            raise SentenceProblem(
                f"span [{start}, {end}] of {mention!r} is outside the text of {len(text)} characters"
            )
        if nfkc(text[start : end + 1]) != nfkc(mention):
            raise SentenceProblem(
                f"span [{start}, {end}] reads {text[start : end + 1]!r}, not its mention {mention!r}"
            )
        if any(tag != "O" for tag in tags[start : end + 1]):
            raise SentenceProblem(f"span [{start}, {end}] of {mention!r} overlaps another entity")
        if start == end:
            tags[start] = f"S-{category}"
        else:
            tags[start] = f"B-{category}"
            tags[start + 1 : end] = [f"I-{category}"] * (end - start - 1)
            tags[end] = f"E-{category}"
    return tags
