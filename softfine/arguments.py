"""TrainConfig as command-line flags, shared by `softfine` and `tune/search.py`: one flag per
field, the values given, and the checks of text arguments argparse lets through."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence

from .errors import ConfigError

# ---------------------------------------------------------------------------------------------
# TrainConfig as flags: one flag per field; a YAML file underneath, the flags given on top.


def add_config_arguments(
    parser: argparse.ArgumentParser, exclude: Sequence[str] = (), only: Sequence[str] | None = None
) -> None:
    """Adds `--field-name` for every TrainConfig field (or those in `only`), with default SUPPRESS
    so that only the flags actually given reach `given_values`. A bool field gets `--NAME` and
    `--no-NAME`."""
    from .config import FINE_TUNING, FROM_SCRATCH, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {f.default})",
            )
            continue
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X]: X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        base = kind
        choices = typing.get_args(base) if typing.get_origin(base) is typing.Literal else None
        if f.name in FINE_TUNING:
            default = f"{FINE_TUNING[f.name]}; tiny: {FROM_SCRATCH[f.name]}"
        else:
            default = f.default
        shown = f" (default: {default})" if default is not None else ""  # None: the help says what happens
        parser.add_argument(
            flag,
            dest=f.name,
            type=str if choices else base,
            choices=choices,
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=help_text + shown,
        )


def given_values(args: argparse.Namespace, exclude: Sequence[str] = ()) -> dict:
    """The TrainConfig fields given on the command line."""
    from .config import FIELDS

    return {k: v for k, v in vars(args).items() if k in FIELDS and k not in exclude}


# ---------------------------------------------------------------------------------------------
# Text the shell gave: UTF-8 (Python holds other bytes as lone surrogates, which would reach the
# model or a file name) and not empty (an empty --data-dir must not mean "the default one").

WANTED = {
    "data_dir": "a directory",
    "out": "a directory",
    "model": "a Hugging Face name, a local directory or tiny",
    "config": "a YAML file",
    "checkpoint": "a checkpoint directory",
    "label_separator": "a separator",
    "text": "a text to tag",
}


def flag_names(parser: argparse.ArgumentParser) -> dict[str, tuple[str, bool]]:
    """dest -> (the flag as a user writes it, whether it may be left out), every subcommand's too."""
    names: dict[str, tuple[str, bool]] = {}
    for action in parser._actions:  # argparse has no public listing of a parser's arguments
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for dest, name in flag_names(sub).items():
                    names.setdefault(dest, name)
        elif action.option_strings:
            names.setdefault(action.dest, (max(action.option_strings, key=len), not action.required))
        else:
            names.setdefault(action.dest, (action.metavar or action.dest, False))
    return names


def check_text_arguments(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    error: type[Exception] = ConfigError,
    wanted: dict[str, str] | None = None,
) -> None:
    """Every text value given on the command line is valid UTF-8 and not empty; else `error`,
    naming the flag (or the positional argument and its number) and, from `wanted` (dest ->
    what to give), what it takes."""
    names = flag_names(parser)
    wanted = {**WANTED, **(wanted or {})}
    for dest, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for number, text in enumerate(values, 1):
            if not isinstance(text, str):
                continue
            flag, optional = names.get(dest, (f"--{dest.replace('_', '-')}", True))
            if dest == "text":  # predict's texts, one argument each
                flag = f"text {number}"
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                byte = text[err.start].encode("utf-8", "surrogateescape")[0]
                raise error(
                    f"{flag} '{shown}': not valid UTF-8 (byte 0x{byte:02x} at character {err.start + 1}); "
                    "give UTF-8 text (check the terminal's or the file's encoding)"
                ) from None
            if not text:
                what = wanted.get(dest, "a value")
                either = ", or" if " or " in what else " or"
                raise error(
                    f"{flag} '': empty; give {what}" + (f"{either} leave the flag out" if optional else "")
                )
