"""The `softfine` command: data, labels, train, evaluate, predict.

    softfine data download weibo
    softfine data stats weibo
    softfine labels --dataset fine --beta 4 --gamma 2 --gold B-/work/video/teleplay
    softfine train --dataset resume --model tiny --epochs 3 --out runs/resume-tiny
    softfine evaluate --checkpoint runs/resume-tiny/best --dataset resume --split test
    softfine predict --checkpoint runs/resume-tiny/best "高勇：男，中国国籍。"

Problems the user can fix (bad data, impossible flags, a missing device) end with one line,
`softfine: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, SoftFiNEError

log = logging.getLogger("softfine")


# ---------------------------------------------------------------------------------------------
# Config dataclasses as flags: one flag per field, YAML values underneath, explicit flags on top.

def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, exclude: Sequence[str] = ()) -> None:
    """Adds `--field-name` for every field of `cls`, with default SUPPRESS so that only the flags
    actually given reach `config_from_args`. A bool field that defaults to True gets `--no-NAME`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = hints[f.name]
        if kind is bool:
            if f.default is True:
                parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                    default=argparse.SUPPRESS, help=help_text)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS,
                                    help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        parser.add_argument(flag, dest=f.name, type=base, default=argparse.SUPPRESS, metavar=f.name.upper(),
                            help=f"{help_text} (default: {f.default})")


def read_yaml_config(path: str | Path, cls: type) -> dict:
    """A YAML mapping of `cls` fields; an unknown key is a ConfigError naming it and the file."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: cannot read it ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k.replace("-", "_") not in known]
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(map(str, unknown))}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def config_from_args(cls: type, args: argparse.Namespace, base: dict | None = None):
    """`cls(**base)` with every field given on the command line overriding it."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(base or {})
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# Commands.

def cmd_data_download(args: argparse.Namespace) -> None:
    from .datasets import download

    for split, path in download(args.name, args.data_dir, mirror=args.mirror, splits=args.split,
                                force=args.force).items():
        print(f"{split}\t{path}")


def cmd_data_stats(args: argparse.Namespace) -> None:
    from .data import stats
    from .datasets import SPLITS, available_splits, get_spec, read_split

    splits = available_splits(args.name, args.data_dir)
    if not splits:
        from .datasets import dataset_files
        dataset_files(args.name, args.data_dir)  # raises, naming the missing files
    on_problem = "error" if args.strict else "keep"
    rows = {s: stats(read_split(args.name, s, args.data_dir, on_problem)) for s in splits}
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
        space = LabelSpace.from_categories(args.categories.split(","), args.label_separator)
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
    row = space.soft_targets(args.beta, args.gamma)[gold].tolist()
    scores = sorted(zip(space.labels, row), key=lambda pair: -pair[1])
    if args.json:
        print(json.dumps(dict(scores), ensure_ascii=False, indent=1))
        return
    width = max(len(label) for label in space.labels)
    print(f"relevance to {args.gold} (beta={args.beta}, gamma={args.gamma})")
    print(f"{'label':<{width}}  miss  wrong  score")
    for label, score in scores:
        miss, wrong = space.miss_wrong(args.gold, label) if "O" not in (label, args.gold) else ("-", "-")
        print(f"{label:<{width}}  {miss:>4}  {wrong:>5}  {score:.6g}")


def cmd_train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, train

    base = read_yaml_config(args.config, TrainConfig) if args.config else {}
    config = config_from_args(TrainConfig, args, base).validate()
    result = train(config)
    print(json.dumps(result, indent=1))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .datasets import read_split
    from .model import CharIds, load_checkpoint
    from .train import Split, encode, evaluate, resolve_device

    device = resolve_device(args.device)
    model, tokenizer, labels, config = load_checkpoint(args.checkpoint, device)
    sentences = read_split(args.dataset, args.split, args.data_dir, "error" if args.strict else "skip")
    sentences = sentences[:args.limit] if args.limit else sentences
    try:
        examples = encode(sentences, CharIds(tokenizer), labels, config.get("max_length", 512))
    except KeyError as err:
        raise ConfigError(f"--dataset {args.dataset}: {err.args[0]}; was the checkpoint trained on it?") from None
    scores = evaluate(model, Split(sentences, examples), labels, device)
    if args.json:
        print(json.dumps(scores, indent=1, ensure_ascii=False))
        return
    print(f"{args.dataset} {args.split}: {len(sentences)} sentences")
    print(f"precision {scores['precision']:.4f}  recall {scores['recall']:.4f}  f1 {scores['f1']:.4f}")
    for key in sorted(k for k in scores if k.startswith("f1_level")):
        print(f"{key} {scores[key]:.4f}")
    for category, s in sorted(scores["per_category"].items()):
        print(f"  {category:<40} P {s['precision']:.4f}  R {s['recall']:.4f}  F1 {s['f1']:.4f}  n={s['support']}")


def cmd_predict(args: argparse.Namespace) -> None:
    from .predict import Predictor

    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device)
    for text, found in zip(texts, predictor.predict(texts)):
        print(json.dumps({"text": text, "entities": found}, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="softfine", description="SoftFiNE: fine-grained Chinese NER with "
                                     "hierarchical soft labels and entity augmentation (Yang et al., ACL 2023).")
    parser.add_argument("--version", action="version", version=f"softfine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="download datasets, print their statistics")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    download = data_commands.add_parser("download", help="fetch a dataset from its public origin, checksummed")
    download.add_argument("name", help="weibo, resume or fine")
    download.add_argument("--data-dir", help="data directory (default: $SOFTFINE_DATA_DIR, else ~/.cache/softfine/data)")
    download.add_argument("--mirror", help="base URL of a mirror laid out like the data directory "
                          "(MIRROR/NAME/FILE) instead of the public origin")
    download.add_argument("--split", nargs="+", default=["train", "dev", "test"], choices=["train", "dev", "test"])
    download.add_argument("--force", action="store_true", help="download even files already present and valid")
    download.set_defaults(func=cmd_data_download)
    stats = data_commands.add_parser("stats", help="per split: sentences, average characters, average entities, "
                                     "categories (the paper's Table 1)")
    stats.add_argument("name")
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
    labels.add_argument("--beta", type=float, required=True)
    labels.add_argument("--gamma", type=float, required=True)
    labels.add_argument("--gold", required=True, help="gold label, e.g. B-/work/video/teleplay")
    labels.add_argument("--json", action="store_true", help="print an object label -> score")
    labels.set_defaults(func=cmd_labels)

    train = commands.add_parser("train", help="train SoftFiNE, keep the best checkpoint by dev F1, test it",
                                argument_default=argparse.SUPPRESS)
    train.add_argument("--config", default=None, help="YAML file of options; flags override it")
    add_dataclass_arguments(train, TrainConfig)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="score a checkpoint on a dataset split")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--split", default="test", choices=["train", "dev", "test"])
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--limit", type=int, help="only the first N sentences")
    evaluate.add_argument("--strict", action="store_true")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = commands.add_parser("predict", help="print entities of texts as JSON lines")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("--device", default="auto")
    predict.add_argument("text", nargs="*", help="texts (default: one per line on standard input)")
    predict.set_defaults(func=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except SoftFiNEError as err:
        print(f"softfine: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softfine: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
