"""The `softfine` command: data, labels, train, evaluate, predict.

    softfine data download weibo
    softfine data stats weibo
    softfine labels --dataset fine --beta 4 --gamma 2 --gold B-/work/video/teleplay
    softfine train --dataset resume --model tiny --epochs 3 --out runs/resume-tiny
    softfine evaluate --checkpoint runs/resume-tiny/best --dataset resume --split test
    softfine predict --checkpoint runs/resume-tiny/best "高勇：男，中国国籍。"

Problems the user can fix (bad data, impossible flags, a missing device, a full disk) end with one
line, `softfine: error: ...`, and exit status 2; `-v` adds the traceback for a bug report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import types
import typing
from typing import Sequence

from .errors import ConfigError, SoftFiNEError

log = logging.getLogger("softfine")


# ---------------------------------------------------------------------------------------------
# TrainConfig as flags: one flag per field; a YAML file underneath, the flags given on top.

def add_config_arguments(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """Adds `--field-name` for every TrainConfig field, with default SUPPRESS so that only the
    flags actually given reach `given_values`. A bool field gets `--NAME` and `--no-NAME`."""
    from .config import FINE_TUNING, FROM_SCRATCH, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_text} (default: {f.default})")
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
        parser.add_argument(flag, dest=f.name, type=str if choices else base, choices=choices,
                            default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text + shown)


def given_values(args: argparse.Namespace, exclude: Sequence[str] = ()) -> dict:
    """The TrainConfig fields given on the command line."""
    from .config import FIELDS

    return {k: v for k, v in vars(args).items() if k in FIELDS and k not in exclude}


# ---------------------------------------------------------------------------------------------
# Text the shell gave: UTF-8 (Python holds other bytes as lone surrogates, which would reach the
# model or a file name) and not empty (an empty --data-dir must not mean "the default one").

WANTED = {"data_dir": "a directory", "out": "a directory", "model": "a Hugging Face name, a local directory or tiny",
          "config": "a YAML file", "checkpoint": "a checkpoint directory", "label_separator": "a separator",
          "text": "a text to tag"}


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


def check_text_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                         error: type[Exception] = ConfigError, wanted: dict[str, str] | None = None) -> None:
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
                raise error(f"{flag} '{shown}': not valid UTF-8 (byte 0x{byte:02x} at character {err.start + 1}); "
                            "give UTF-8 text (check the terminal's or the file's encoding)") from None
            if not text:
                what = wanted.get(dest, "a value")
                either = ", or" if " or " in what else " or"
                raise error(f"{flag} '': empty; give {what}" + (f"{either} leave the flag out" if optional else ""))


# ---------------------------------------------------------------------------------------------
# Commands.

def cmd_data_download(args: argparse.Namespace) -> None:
    from .datasets import download

    for split, path in download(args.name, args.data_dir, mirror=args.mirror, splits=args.split,
                                force=args.force, allow_unverified=args.allow_unverified).items():
        print(f"{split}\t{path}")


def cmd_data_stats(args: argparse.Namespace) -> None:
    from .data import stats
    from .datasets import SPLITS, available_splits, get_spec, read_split

    splits = available_splits(args.name, args.data_dir)
    if not splits:
        from .datasets import dataset_files
        dataset_files(args.name, args.data_dir)  # raises, naming the missing files
    rows = {s: stats(read_split(args.name, s, args.data_dir, args.strict)) for s in splits}
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{args.name}: {get_spec(args.name).note}")
    print(f"{'split':<6} {'sentences':>9} {'avg chars':>9} {'avg ent.':>8} {'categories':>10}")
    for split in SPLITS:
        if split in rows:
            r = rows[split]
            print(f"{split:<6} {r['sentences']:>9} {r['avg_chars']:>9.1f} {r['avg_entities']:>8.1f} "
                  f"{r['categories']:>10}")
        else:
            print(f"{split:<6} {'missing':>9}")


def cmd_labels(args: argparse.Namespace) -> None:
    from .labels import LabelSpace

    if args.categories:
        given = args.categories.split(",")
        empty = next((i for i, c in enumerate(given, 1) if not c.strip()), None)
        if empty is not None:  # "A,,B" would make the labels B-, I-, ... of an empty category
            raise ConfigError(f"--categories {args.categories!r}: category {empty} is empty; give categories "
                              "separated by single commas")
        space = LabelSpace.from_categories(given, args.label_separator)
    else:
        from .data import categories
        from .datasets import available_splits, dataset_files, get_spec, read_split

        splits = available_splits(args.dataset, args.data_dir) or dataset_files(args.dataset, args.data_dir)
        found = {c for s in splits for c in categories(read_split(args.dataset, s, args.data_dir))}
        separator = args.label_separator if args.label_separator is not None else get_spec(args.dataset).label_separator
        space = LabelSpace.from_categories(found, separator)
    try:
        gold = space.index(args.gold)
    except KeyError as err:
        raise ConfigError(f"--gold: {err.args[0]}") from None
    row = space.soft_targets(args.beta, args.gamma, args.soft_scope)[gold].tolist()
    scores = sorted(zip(space.labels, row), key=lambda pair: -pair[1])
    if args.json:
        print(json.dumps(dict(scores), ensure_ascii=False, indent=1))
        return
    width = max(len(label) for label in space.labels)
    print(f"relevance to {args.gold} (beta={args.beta}, gamma={args.gamma}, scope {args.soft_scope})")
    print(f"{'label':<{width}}  miss  wrong  score")
    for label, score in scores:
        miss, wrong = space.miss_wrong(args.gold, label) if "O" not in (label, args.gold) else ("-", "-")
        print(f"{label:<{width}}  {miss:>4}  {wrong:>5}  {score:.6g}")


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config, make_config
    from .train import train

    from tqdm.contrib.logging import logging_redirect_tqdm

    flags = given_values(args)
    config = load_config(args.config, flags) if args.config else make_config(flags)
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        result = train(config)
    print(json.dumps(result, indent=1))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .datasets import read_split
    from .model import CharIds, load_checkpoint
    from .batches import Split, encode
    from .device import resolve_device
    from .evaluate import evaluate

    device = resolve_device(args.device)
    model, tokenizer, labels, config = load_checkpoint(args.checkpoint, device)
    sentences = read_split(args.dataset, args.split, args.data_dir, args.strict)
    if args.limit is not None:
        if not 1 <= args.limit <= len(sentences):
            raise ConfigError(f"--limit {args.limit}: give 1 to {len(sentences)} ({args.dataset} {args.split} has "
                              f"{len(sentences)} sentences), or leave it out to score the whole split")
        sentences = sentences[:args.limit]
    try:
        examples = encode(sentences, CharIds(tokenizer), labels, config.get("max_length", 512))
    except KeyError as err:
        raise ConfigError(f"--dataset {args.dataset}: {err.args[0]}; was the checkpoint trained on it?") from None
    scores = evaluate(model, Split(sentences, examples), labels, device)
    if args.json:
        print(json.dumps({"dataset": args.dataset, "split": args.split, **scores}, indent=1, ensure_ascii=False))
        return
    print(f"{args.dataset} {args.split}: {scores['sentences']} sentences, {scores['gold_entities']} gold entities")
    print(f"precision {scores['precision']:.4f}  recall {scores['recall']:.4f}  f1 {scores['f1']:.4f}")
    for key in sorted(k for k in scores if k.startswith("f1_level")):
        print(f"{key} {scores[key]:.4f}")
    for category, s in sorted(scores["per_category"].items()):
        print(f"  {category:<40} P {s['precision']:.4f}  R {s['recall']:.4f}  F1 {s['f1']:.4f}  n={s['support']}")


def cmd_predict(args: argparse.Namespace) -> None:
    from .predict import Predictor

    if args.text:
        texts = args.text
    else:
        try:
            # One text a line, whatever the line ends ("\n", "\r\n", "\r"): a "\r" left at a text's end
            # would be echoed back and fed to the model as one more character.
            lines = re.split(r"\r\n|\r|\n", sys.stdin.buffer.read().decode("utf-8"))
            texts = [line for line in lines if line.strip()]
        except UnicodeDecodeError as err:
            raise ConfigError(f"standard input: not UTF-8 text (byte {err.start}); give UTF-8 text, one per line") from None
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device)
    for text, found in zip(texts, predictor.predict(texts)):
        print(json.dumps({"text": text, "entities": found}, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="softfine", description="SoftFiNE: fine-grained Chinese NER with "
                                     "hierarchical soft labels and entity augmentation (Yang et al., ACL 2023).")
    parser.add_argument("--version", action="version", version=f"softfine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="download datasets, print their statistics")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    download = data_commands.add_parser("download", help="fetch a dataset from its public origin, checksummed")
    download.add_argument("name", metavar="dataset", help="weibo, resume or fine")
    download.add_argument("--data-dir", help="data directory (default: $SOFTFINE_DATA_DIR, else ~/.cache/softfine/data)")
    download.add_argument("--mirror", help="base URL of a mirror laid out like the data directory "
                          "(MIRROR/NAME/FILE) instead of the public origin")
    download.add_argument("--split", nargs="+", default=["train", "dev", "test"], choices=["train", "dev", "test"])
    download.add_argument("--force", action="store_true", help="download even files already present and valid")
    download.add_argument("--allow-unverified", action="store_true",
                          help="also save files that have no pinned SHA-256 (FiNE's train.json), with a warning")
    download.set_defaults(func=cmd_data_download)
    stats = data_commands.add_parser("stats", help="per split: sentences, average characters, average entities, "
                                     "categories (the paper's Table 1)")
    stats.add_argument("name", metavar="dataset", help="weibo, resume, ontonotes4 or fine")
    stats.add_argument("--data-dir")
    stats.add_argument("--strict", action="store_true", help="stop at the first data problem")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_data_stats)

    labels = commands.add_parser("labels", help="every label's soft-label relevance to a gold label")
    source = labels.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="take the categories from this dataset's files")
    source.add_argument("--categories", help="comma-separated categories instead of a dataset")
    labels.add_argument("--data-dir")
    labels.add_argument("--label-separator", help="hierarchy separator (default: the dataset's)")
    labels.add_argument("--beta", type=float, required=True, help="soft-label base, > 1")
    labels.add_argument("--gamma", type=float, required=True, help="penalty of a wrong component, > 0")
    labels.add_argument("--gold", required=True, help="gold label, e.g. B-/work/video/teleplay")
    labels.add_argument("--soft-scope", choices=("paper", "related"), default="paper",
                        help="paper: every entity label gets a score; related: only those sharing the segment tag "
                             "or a level at the same depth (the authors' code) (default: paper)")
    labels.add_argument("--json", action="store_true", help="print an object label -> score")
    labels.set_defaults(func=cmd_labels)

    train = commands.add_parser("train", help="train SoftFiNE, keep the best checkpoint by dev F1, test it",
                                argument_default=argparse.SUPPRESS)
    train.add_argument("--config", default=None, help="YAML file of options; flags override it")
    add_config_arguments(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="score a checkpoint on a dataset split")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--split", default="test", choices=["train", "dev", "test"])
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--limit", type=int, help="only the first N sentences")
    evaluate.add_argument("--strict", action="store_true")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object: sentences, gold_entities, "
                          "precision, recall, f1, per_category, ...")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = commands.add_parser("predict", help="print entities of texts as JSON lines")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("--device", default="auto")
    predict.add_argument("text", nargs="*", help="texts (default: one per line on standard input)")
    predict.set_defaults(func=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        check_text_arguments(parser, args)
        args.func(args)
    except SoftFiNEError as err:
        return fail(err, args.verbose)
    except OSError as err:  # a full disk, a folder without write permission: the file and the cause
        where = f"{err.filename}: " if err.filename else ""
        return fail(f"{where}{err.strerror or err}", args.verbose)
    except KeyboardInterrupt:
        print("softfine: interrupted", file=sys.stderr)
        return 130
    return 0


def fail(message: object, verbose: bool) -> int:
    """One line on stderr (the traceback too with -v, for a bug report); exit status 2."""
    if verbose:
        import traceback

        traceback.print_exc()
    print(f"softfine: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
