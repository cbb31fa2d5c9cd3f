"""Users' own files: three formats, detected from the content, read by data.py's rules.

JSON lines with `tokens` and `ner_tags` (Hugging Face's run_ner.py; tags as strings, or integers
named by a labels.txt beside the file or a record's "label_names"), two-column character files
(Resume's and Weibo's layout, any of BIO, BIOES and BMES), and span JSON lines (FiNE's). Every
problem is handled as data.py's docstring says, naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .data import (
    Sentence,
    SentenceProblem,
    _json_object,
    _lines,
    _Problems,
    detect_scheme,
    read_columns,
    read_fine,
    split_tokens,
    to_bioes,
)
from .errors import DataError

FORMATS = {
    "tokens": "JSON lines with tokens and ner_tags",
    "columns": "a two-column character file",
    "spans": "span JSON lines (FiNE's)",
}


def detect_format(path: str | Path) -> str:
    """ "tokens", "spans" or "columns" (FORMATS), from the first line that is not blank: a JSON
    object with "tokens" (run_ner.py's JSON lines), one with "text" (span JSON lines), anything
    else a column file."""
    path = Path(path)
    number, line = first_line(path)
    if not line.lstrip().startswith("{"):
        return "columns"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{number}: the file reads as JSON lines but this line is not valid JSON "
            f"({err.msg}, column {err.colno})"
        ) from None
    if isinstance(record, dict) and "tokens" in record:
        return "tokens"
    if isinstance(record, dict) and "text" in record:
        return "spans"
    keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
    raise DataError(
        f'{path}:{number}: a JSON line with neither "tokens" (and "ner_tags": run_ner.py\'s '
        f'format) nor "text" (and "label": span JSON lines); it has: {keys}'
    )


def first_line(path: Path) -> tuple[int, str]:
    """(number, text) of a file's first line that is not blank, read no further: a format is
    chosen by it, and the reader then reads the whole file by data.py's rules."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    number, pending = 0, ""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # lines end at "\n", as data.py counts them
            while block := f.read(1 << 16):
                *lines, pending = (pending + block).split("\n")
                for line in lines:
                    number += 1
                    if line.strip():
                        return number, line.removesuffix("\r")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror})") from None
    if pending.strip():
        return number + 1, pending
    raise DataError(f"{path}: the file is empty")


def read_token_json(
    path: str | Path,
    scheme: str | None = None,
    label_names: Sequence[str] | None = None,
    on_problem: str = "skip",
) -> list[Sentence]:
    """Hugging Face run_ner.py's JSON lines: `{"tokens": [...], "ner_tags": [...]}`, tags as
    strings, or as integers naming `label_names` (labels.txt) or the record's own "label_names"
    list. `scheme`: the tags' (None: detected); a token of several characters is split into
    characters (`split_tokens`)."""
    path = Path(path)
    problems = _Problems(path, on_problem)
    read = []  # (line, tokens, tags)
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            read.append((number, *_token_record(line, label_names, f"{path}:{number}")))
        except SentenceProblem as problem:
            problems.unreadable(number, str(problem))
    scheme = scheme or detect_scheme((tag for _, _, tags in read for tag in tags), path)
    sentences = []
    for number, tokens, tags in read:
        try:
            chars, char_tags, _ = split_tokens(tokens, tags, scheme)
            bioes, repair = to_bioes(char_tags, scheme)
        except SentenceProblem as problem:
            problems.unreadable(number, str(problem))
            continue
        if repair is not None:
            problems.repaired_tags(number, str(repair))
        sentences.append(Sentence(tuple(chars), tuple(bioes), f"{path}:{number}"))
    problems.summary(len(sentences) + problems.skipped)
    return sentences


def _token_record(line: str, label_names: Sequence[str] | None, where: str) -> tuple[list[str], list[str]]:
    """(tokens, string tags) of one run_ner.py JSON line. Integer tags without label names are a
    DataError: no sentence of the file could be read."""
    record = _json_object(line)
    tokens, tags = record.get("tokens"), record.get("ner_tags")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise SentenceProblem('expected "tokens": a non-empty list of strings')
    if not isinstance(tags, list):
        raise SentenceProblem('expected "ner_tags": a list of tags, one per token')
    if len(tags) != len(tokens):
        raise SentenceProblem(
            f'"ner_tags" has {len(tags)} tags for {len(tokens)} tokens: give one tag per token'
        )
    if all(isinstance(t, str) for t in tags):
        return tokens, tags
    if not all(type(t) is int for t in tags):
        raise SentenceProblem('"ner_tags": expected all strings (B-X, O, ...) or all integers (label ids)')
    names = record.get("label_names", label_names)
    if names is None:
        raise DataError(
            f'{where}: integer "ner_tags" but no label names: put a labels.txt beside the file (one '
            'name a line, in id order) or a "label_names" list in each record'
        )
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise SentenceProblem('"label_names": expected a list of tag names (O, B-X, ...)')
    bad = next((t for t in tags if not 0 <= t < len(names)), None)
    if bad is not None:
        raise SentenceProblem(f"tag id {bad} is not in the {len(names)} label names")
    return tokens, [names[t] for t in tags]


def read_label_names(path: str | Path) -> list[str]:
    """labels.txt: the names of integer tags, one a line, in id order (blank lines ignored)."""
    names = [line.strip() for line in _lines(Path(path)) if line.strip()]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise DataError(
            f"{path}: the label name {twice!r} is written twice; give each name once, in id order"
        )
    return names


def read_user_file(
    path: str | Path,
    fmt: str,
    scheme: str | None = None,
    label_names: Sequence[str] | None = None,
    on_problem: str = "skip",
) -> list[Sentence]:
    """A user's file in format `fmt` (FORMATS; see `detect_format`)."""
    if fmt == "tokens":
        return read_token_json(path, scheme, label_names, on_problem)
    if fmt == "spans":
        return read_fine(path, on_problem)
    return read_columns(
        path, scheme=scheme, delimiter=_column_delimiter(path), words=True, on_problem=on_problem
    )


def _column_delimiter(path: str | Path) -> str:
    """A tab where the first line holds one, else a space (Weibo's and Resume's own layouts)."""
    return "\t" if "\t" in first_line(Path(path))[1] else " "
