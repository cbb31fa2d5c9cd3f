"""Readers: every dataset becomes a list of sentences of characters with BIOES tags.

Tags are `O` or `<seg>-<category>` with seg in B/I/E/S; the category is kept as written in the
source (`PER.NAM`, `NAME`, `/organization/company/vehicle_brand`). Splitting a category into its
hierarchy levels is the label space's job (labels.py), not the readers'.

Problem policy, the same for every reader:
- a missing or empty file, or one that is not UTF-8, is always an error (DataError);
- a problem inside a sentence (a malformed line, an unknown tag prefix, an I/E tag with no opening
  B, an entity left open, a span that does not match its mention text, overlapping spans) drops
  that whole sentence with a warning naming file and line, and a count at the end; with
  `on_problem="error"` the first such problem is an error instead. A sentence is never kept with a
  guessed label.

`on_problem` selects the policy: "skip" (the default), "error" (what `--strict` sets), or "keep",
which keeps such sentences with their tags as written; only `softfine data stats` uses it, to count
a file the way the paper's Table 1 does.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .errors import DataError

log = logging.getLogger(__name__)

SEGMENTS = ("B", "I", "E", "S")
_PREFIXES = {
    "bio": {"B": "B", "I": "I"},
    "bioes": {"B": "B", "I": "I", "E": "E", "S": "S"},
    "bmes": {"B": "B", "M": "I", "E": "E", "S": "S"},
}


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


def to_bioes(tags: Sequence[str], scheme: str) -> list[str]:
    """Validate a tag sequence in `scheme` (bio, bioes, bmes) and rewrite it in BIOES.

    Raises SentenceProblem naming the position (0-based) of the first bad tag.
    """
    prefixes = _PREFIXES[scheme]
    parsed: list[tuple[str, str]] = []
    for i, tag in enumerate(tags):
        if tag == "O":
            parsed.append(("O", ""))
            continue
        seg, sep, category = tag.partition("-")
        if not sep or seg not in prefixes or not category:
            known = "/".join(prefixes)
            raise SentenceProblem(f"tag {tag!r} at character {i + 1}: unknown tag prefix "
                                  f"(expected O or {known}-CATEGORY for {scheme.upper()})", i)
        parsed.append((prefixes[seg], category))

    out: list[str] = []
    open_category = None  # category of the entity being read, if any
    for i, (seg, category) in enumerate(parsed):
        if seg in ("I", "E"):
            if open_category != category:
                raise SentenceProblem(f"tag {tags[i]!r} at character {i + 1} has no opening B-{category}", i)
        elif open_category is not None and scheme != "bio":
            raise SentenceProblem(f"entity {open_category!r} opened before character {i + 1} is never "
                                  f"closed with E-{open_category}", i)
        open_category = category if seg in ("B", "I") else None
        out.append("O" if seg == "O" else f"{seg}-{category}")
    if open_category is not None and scheme != "bio":
        raise SentenceProblem(f"entity {open_category!r} is still open at the end of the sentence",
                              len(parsed) - 1)
    if scheme == "bio":  # a B or I not continued by I of its category ends its entity
        for i, (seg, category) in enumerate(parsed):
            continued = i + 1 < len(parsed) and parsed[i + 1] == ("I", category)
            if seg == "B" and not continued:
                out[i] = f"S-{category}"
            elif seg == "I" and not continued:
                out[i] = f"E-{category}"
    return out


ON_PROBLEM = ("skip", "error", "keep")


class _Problems:
    """Applies the module's problem policy (see the docstring) and counts what it did."""

    def __init__(self, path: Path, on_problem: str):
        if on_problem not in ON_PROBLEM:
            raise ValueError(f"on_problem must be one of {ON_PROBLEM}, got {on_problem!r}")
        self.path, self.on_problem, self.count = path, on_problem, 0

    def report(self, line: int, message: str) -> bool:
        """Record a problem; True when the sentence is kept anyway."""
        where = f"{self.path}:{line}: {message}"
        if self.on_problem == "error":
            raise DataError(where)
        self.count += 1
        keep = self.on_problem == "keep"
        log.warning("%s (sentence %s)", where, "kept as written" if keep else "skipped")
        return keep

    def summary(self, total: int) -> None:
        if self.count:
            done = "kept as written" if self.on_problem == "keep" else "skipped"
            log.warning("%s: %s %d of %d sentences with problems (see warnings above; "
                        "--strict makes them errors)", self.path, done, self.count, total)


def _lines(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text.splitlines()


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


def read_columns(path: str | Path, *, scheme: str = "bioes", delimiter: str | None = None,
                 strip_position_digits: bool = False, on_problem: str = "skip") -> list[Sentence]:
    """Read a one-character-per-line file: `CHAR<delimiter>TAG`, blank lines between sentences.

    `scheme` is the tagging scheme of the file (bio, bioes or bmes); tags are returned in BIOES.
    `delimiter=None` splits on whitespace and takes the first and last columns. With
    `strip_position_digits`, the word-position digits that Weibo appends to each character are
    removed (`科0` -> `科`).
    """
    if scheme not in _PREFIXES:
        raise ValueError(f"unknown tagging scheme {scheme!r}; expected one of {sorted(_PREFIXES)}")
    path = Path(path)
    problems = _Problems(path, on_problem)
    sentences = []
    for start, block in _blocks(_lines(path)):
        chars, tags = [], []
        try:
            for offset, line in enumerate(block):
                fields = line.split(delimiter) if delimiter is None else line.rsplit(delimiter, 1)
                if len(fields) < 2 or not fields[0] or not fields[-1].strip():
                    sep = "whitespace" if delimiter is None else repr(delimiter)
                    raise SentenceProblem(f"malformed line {line!r}: expected CHAR, {sep}, TAG", offset)
                char, tag = fields[0], fields[-1].strip()
                if strip_position_digits:
                    match = _WEIBO_CHAR.fullmatch(char)
                    if not match:
                        raise SentenceProblem(f"malformed character {char!r}: expected a character "
                                              "followed by its word-position digits", offset)
                    char = match.group(1)
                chars.append(char)
                tags.append(tag)
            bioes = to_bioes(tags, scheme)
        except SentenceProblem as problem:  # index: the line (= character) within the sentence
            if not problems.report(start + problem.index, str(problem)) or len(tags) < len(block):
                continue
            bioes = tags
        sentences.append(Sentence(tuple(chars), tuple(bioes), f"{path}:{start}"))
    problems.summary(len(sentences) + (0 if on_problem == "keep" else problems.count))
    return sentences


def read_weibo(path: str | Path, on_problem: str = "skip") -> list[Sentence]:
    """Weibo NER: `CHAR<TAB>TAG`, BIO, each character followed by its word-position digits."""
    return read_columns(path, scheme="bio", delimiter="\t", strip_position_digits=True,
                        on_problem=on_problem)


def read_bmes(path: str | Path, on_problem: str = "skip") -> list[Sentence]:
    """Resume and OntoNotes 4.0 (the usual Chinese NER release): `CHAR<SPACE>TAG`, BMES."""
    return read_columns(path, scheme="bmes", delimiter=" ", on_problem=on_problem)


def read_fine(path: str | Path, on_problem: str = "skip") -> list[Sentence]:
    """FiNE: JSON lines `{"id", "text", "label": {CATEGORY: {MENTION: [[start, end], ...]}}}`.

    Offsets are characters, `end` inclusive; CATEGORY is a path such as `/person/entertainment`.
    """
    path = Path(path)
    problems = _Problems(path, on_problem)
    sentences = []
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.report(number, f"not valid JSON ({err.msg}, column {err.colno})")
            continue  # nothing to keep, whatever the policy
        try:
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SentenceProblem('expected an object with a "text" string')
            text = record["text"]
            tags = _fine_tags(text, record.get("label") or {})
        except SentenceProblem as problem:
            sid = record.get("id") if isinstance(record, dict) else None
            keep = problems.report(number, f"id {sid}: {problem}")
            try:  # the "keep" policy: every in-range span, as written
                if not keep:
                    continue
                text = record["text"]
                tags = _fine_tags(text, record.get("label") or {}, check=False)
            except (SentenceProblem, KeyError, TypeError, AttributeError):
                continue
        where = f"{path}:{number} (id {record.get('id')})"
        sentences.append(Sentence(tuple(text), tuple(tags), where))
    problems.summary(len(sentences) + (0 if on_problem == "keep" else problems.count))
    return sentences


def _fine_spans(labels: dict) -> Iterator[tuple[str, str, int, int]]:
    """(category, mention, start, end) of a FiNE "label" field, checking its shape."""
    try:
        for category, mentions in labels.items():
            for mention, spans in mentions.items():
                for start, end in spans:
                    if not (isinstance(start, int) and isinstance(end, int)):
                        raise TypeError
                    yield category, mention, start, end
    except (AttributeError, TypeError, ValueError):
        raise SentenceProblem('malformed "label": expected {CATEGORY: {MENTION: [[start, end], ...]}}') from None


def _fine_tags(text: str, labels: dict, check: bool = True) -> list[str]:
    """BIOES tags of a FiNE record; `check=False` (the "keep" policy) writes every in-range span."""
    tags = ["O"] * len(text)
    for category, mention, start, end in _fine_spans(labels):
        if not check and 0 <= start <= end < len(text):
            pass
        elif not (0 <= start <= end < len(text)):
            raise SentenceProblem(f"span [{start}, {end}] of {mention!r} is outside the "
                                  f"text of {len(text)} characters")
        elif text[start:end + 1] != mention:
            raise SentenceProblem(f"span [{start}, {end}] reads {text[start:end + 1]!r}, "
                                  f"not its mention {mention!r}")
        elif any(tag != "O" for tag in tags[start:end + 1]):
            raise SentenceProblem(f"span [{start}, {end}] of {mention!r} overlaps another entity")
        if start == end:
            tags[start] = f"S-{category}"
        else:
            tags[start] = f"B-{category}"
            tags[start + 1:end] = [f"I-{category}"] * (end - start - 1)
            tags[end] = f"E-{category}"
    return tags


def categories(sentences: Sequence[Sentence]) -> list[str]:
    """Sorted entity categories that occur in `sentences`."""
    return sorted({tag[2:] for s in sentences for tag in s.tags if tag != "O"})


def _entity_starts(tags: Sequence[str]) -> int:
    """Entities in a tag sequence counted the conlleval way, which also reads tags as written
    (an I/M/E that continues no entity starts one)."""
    count, previous = 0, "O"
    for tag in tags:
        seg, _, category = tag.partition("-")
        p_seg, _, p_category = previous.partition("-")
        continues = seg in "IME" and p_seg in "BIM" and p_category == category
        count += tag != "O" and not continues
        previous = tag
    return count


def stats(sentences: Sequence[Sentence]) -> dict:
    """The figures of the paper's Table 1: sentences, average characters, average entities, categories."""
    n = len(sentences)
    n_entities = sum(_entity_starts(s.tags) for s in sentences)
    return {
        "sentences": n,
        "avg_chars": sum(map(len, sentences)) / n if n else 0.0,
        "avg_entities": n_entities / n if n else 0.0,
        "categories": len(categories(sentences)),
    }
