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
import json
import logging
import re
import sys
from collections.abc import Sequence

from .arguments import add_config_arguments, check_text_arguments, given_values
from .config import DATA_FIELDS, MAX_TOKENS, SCOPES
from .errors import ConfigError, SoftFiNEError

log = logging.getLogger("softfine")


# ---------------------------------------------------------------------------------------------
# Commands.


def cmd_data_download(args: argparse.Namespace) -> None:
    from .download import download

    for split, path in download(
        args.name,
        args.data_dir,
        mirror=args.mirror,
        splits=args.split,
        force=args.force,
        allow_unverified=args.allow_unverified,
    ).items():
        print(f"{split}\t{path}")


def cmd_data_stats(args: argparse.Namespace) -> None:
    from .datasets import SPLITS, available_splits, get_spec, read_split
    from .stats import stats

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
            print(
                f"{split:<6} {r['sentences']:>9} {r['avg_chars']:>9.1f} {r['avg_entities']:>8.1f} "
                f"{r['categories']:>10}"
            )
        else:
            print(f"{split:<6} {'missing':>9}")


def cmd_labels(args: argparse.Namespace) -> None:
    from .labels import LabelSpace

    data = [
        f"--{k.replace('_', '-')}"
        for k in ("dataset", "train_file", "validation_file", "test_file")
        if getattr(args, k, None) is not None
    ]
    if args.categories is not None and data:
        raise ConfigError(f"--categories and {data[0]}: give categories or a dataset, not both")
    if args.categories is None and not data:
        raise ConfigError("give --dataset (a built-in name or a folder), --train-file or --categories")
    if args.categories:
        given = args.categories.split(",")
        empty = next((i for i, c in enumerate(given, 1) if not c.strip()), None)
        if empty is not None:  # "A,,B" would make the labels B-, I-, ... of an empty category
            raise ConfigError(
                f"--categories {args.categories!r}: category {empty} is empty; give categories "
                "separated by single commas"
            )
        corpus, space = None, LabelSpace.from_categories(given, getattr(args, "label_separator", None))
    else:
        from .datasets import data_source, load_corpus
        from .stats import categories

        config = data_config(args)
        corpus = load_corpus(config, [s for s in ("train", "dev", "test") if s in data_source(config).files])
        found = {c for sentences in corpus.splits.values() for c in categories(sentences)}
        space = LabelSpace.infer(sorted(found), config.label_separator)
    if args.gold is None:
        if corpus is None:
            raise ConfigError(
                "--categories: give --gold too (the label space of a dataset is printed without it)"
            )
        return print_label_space(corpus, space, args.json)
    missing = [flag for flag, value in (("--beta", args.beta), ("--gamma", args.gamma)) if value is None]
    if missing:
        raise ConfigError(
            f"--gold {args.gold}: give {' and '.join(missing)} too (the soft label's base and penalty)"
        )
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


def print_label_space(corpus, space, as_json: bool) -> None:
    """A dataset's label space, its hierarchy's levels and Table 1's figures per split."""
    from .formats import FORMATS
    from .stats import categories, entity_counts, stats

    rows = {
        split: {
            **stats(sentences),
            "file": corpus.files[split]["path"],
            **({"carved": corpus.files[split]["carved"]} if "carved" in corpus.files[split] else {}),
            "categories_per_level": type(space).infer(categories(sentences), space.separator).level_counts(),
        }
        for split, sentences in corpus.splits.items()
    }
    counts = {split: entity_counts(sentences) for split, sentences in corpus.splits.items()}
    summary = {
        "dataset": corpus.name,
        "separator": space.separator,
        "levels": space.level_counts(),
        "labels": space.labels,
        "splits": rows,
        "unseen_in_train": corpus.unseen,
        "entities": {c: {split: counts[split].get(c, 0) for split in counts} for c in space.categories},
    }
    if as_json:
        print(json.dumps(summary, ensure_ascii=False, indent=1))
        return
    shown = repr(space.separator) if space.separator else "none, one level"
    formats = {f["format"] for f in corpus.files.values()}
    print(
        f"{corpus.name} ({', '.join(FORMATS.get(f, f) for f in sorted(formats))}): "
        f"{len(space.categories)} categories, {len(space)} labels (O, and B/I/E/S of each); "
        f"separator {shown}; nodes per level: {' / '.join(map(str, space.level_counts()))}"
    )
    print(
        f"{'split':<6} {'sentences':>9} {'avg chars':>9} {'avg ent.':>8} {'categories':>10} "
        f"{'per level':>10}  file"
    )
    for split, r in rows.items():
        carved = f" (carved: {r['carved']})" if "carved" in r else ""
        print(
            f"{split:<6} {r['sentences']:>9} {r['avg_chars']:>9.1f} {r['avg_entities']:>8.1f} "
            f"{r['categories']:>10} "
            f"{'/'.join(map(str, r['categories_per_level'])):>10}  {r['file']}{carved}"
        )
    width = max(len(c) for c in space.categories)
    print(f"\n{'category':<{width}}  " + "  ".join(f"{split:>6}" for split in counts))
    for category in space.categories:
        print(
            f"{category:<{width}}  " + "  ".join(f"{counts[split].get(category, 0):>6}" for split in counts)
        )
    for split, unseen in corpus.unseen.items():
        print(
            f"\n{split}: {sum(unseen.values())} gold entities of categories train never has: "
            + ", ".join(f"{c} ({n})" for c, n in unseen.items())
        )


def data_config(args: argparse.Namespace):
    """A command's data flags (DATA_FIELDS) as a TrainConfig: every command finds data by one set of rules."""
    from .config import make_config

    return make_config(
        {k: v for k, v in given_values(args).items() if k in DATA_FIELDS + ("label_separator",)}
    )


def cmd_train(args: argparse.Namespace) -> None:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .config import load_config, make_config
    from .train import train

    flags = given_values(args)
    config = load_config(args.config, flags) if args.config else make_config(flags)
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        result = train(config)
    print(json.dumps(result, indent=1))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .batches import Split, encode
    from .datasets import load_corpus
    from .device import resolve_device
    from .evaluate import evaluate
    from .model import CharIds, load_checkpoint
    from .stats import categories, entity_counts

    device = resolve_device(args.device)
    model, tokenizer, labels, config = load_checkpoint(args.checkpoint, device)
    data = data_config(args)
    corpus = load_corpus(data, [args.split])
    sentences = corpus.splits[args.split]
    if args.limit is not None:
        if not 1 <= args.limit <= len(sentences):
            raise ConfigError(
                f"--limit {args.limit}: give 1 to {len(sentences)} ({corpus.name} {args.split} has "
                f"{len(sentences)} sentences), or leave it out to score the whole split"
            )
        sentences = sentences[: args.limit]
    found = categories(sentences)
    unknown = {c: n for c, n in entity_counts(sentences).items() if c not in labels.categories}
    if found and len(unknown) == len(found):  # no category in common: another dataset's checkpoint
        raise ConfigError(
            f"--dataset {data.dataset or corpus.name}: label 'B-{found[0]}' (and every other) is not in "
            f"the checkpoint's label space ({', '.join(labels.categories[:3])}, ...); was the checkpoint "
            "trained on it?"
        )
    if unknown:
        log.warning(
            "%s %s: %d gold entities of %d categories the checkpoint has no label for (%s): scored as missed",
            corpus.name,
            args.split,
            sum(unknown.values()),
            len(unknown),
            ", ".join(f"{c} {n}" for c, n in sorted(unknown.items())),
        )
    examples = encode(
        sentences, CharIds(tokenizer), labels, config.get("max_length", MAX_TOKENS), unknown_as_o=True
    )
    scores = evaluate(model, Split(sentences, examples), labels, device)
    scores["unseen_entities"] = sum(unknown.values())
    if args.json:
        print(
            json.dumps({"dataset": corpus.name, "split": args.split, **scores}, indent=1, ensure_ascii=False)
        )
        return
    print(
        f"{corpus.name} {args.split}: {scores['sentences']} sentences, {scores['gold_entities']} "
        "gold entities"
        + (f" ({scores['unseen_entities']} of categories the checkpoint does not know)" if unknown else "")
    )
    print(f"precision {scores['precision']:.4f}  recall {scores['recall']:.4f}  f1 {scores['f1']:.4f}")
    for key in sorted(k for k in scores if k.startswith("f1_level")):
        print(f"{key} {scores[key]:.4f}")
    for category, s in sorted(scores["per_category"].items()):
        print(
            f"  {category:<40} P {s['precision']:.4f}  R {s['recall']:.4f}  F1 {s['f1']:.4f}  "
            f"n={s['support']}"
        )


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
            raise ConfigError(
                f"standard input: not UTF-8 text (byte {err.start}); give UTF-8 text, one per line"
            ) from None
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device)
    for text, found in zip(texts, predictor.predict(texts)):
        print(json.dumps({"text": text, "entities": found}, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="softfine",
        description="SoftFiNE: fine-grained Chinese NER with "
        "hierarchical soft labels and entity augmentation (Yang et al., ACL 2023).",
    )
    parser.add_argument("--version", action="version", version=f"softfine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="download datasets, print their statistics")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    download = data_commands.add_parser(
        "download", help="fetch a dataset from its public origin, checksummed"
    )
    download.add_argument("name", metavar="dataset", help="weibo, resume or fine")
    download.add_argument(
        "--data-dir", help="data directory (default: $SOFTFINE_DATA_DIR, else ~/.cache/softfine/data)"
    )
    download.add_argument(
        "--mirror",
        help="base URL of a mirror laid out like the data directory "
        "(MIRROR/NAME/FILE) instead of the public origin",
    )
    download.add_argument(
        "--split", nargs="+", default=["train", "dev", "test"], choices=["train", "dev", "test"]
    )
    download.add_argument(
        "--force", action="store_true", help="download even files already present and valid"
    )
    download.add_argument(
        "--allow-unverified",
        action="store_true",
        help="also save files that have no pinned SHA-256 (FiNE's train.json), with a warning",
    )
    download.set_defaults(func=cmd_data_download)
    stats = data_commands.add_parser(
        "stats",
        help="per split: sentences, average characters, average entities, categories (the paper's Table 1)",
    )
    stats.add_argument("name", metavar="dataset", help="weibo, resume, ontonotes4 or fine")
    stats.add_argument("--data-dir")
    stats.add_argument("--strict", action="store_true", help="stop at the first data problem")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_data_stats)

    labels = commands.add_parser(
        "labels",
        help="a dataset's label space, hierarchy and statistics; with --gold, "
        "every label's soft-label relevance to it",
        argument_default=argparse.SUPPRESS,
    )
    add_config_arguments(labels, only=DATA_FIELDS + ("label_separator",))
    labels.add_argument("--categories", default=None, help="comma-separated categories instead of a dataset")
    labels.add_argument("--beta", type=float, default=None, help="soft-label base, > 1 (with --gold)")
    labels.add_argument(
        "--gamma", type=float, default=None, help="penalty of a wrong component, > 0 (with --gold)"
    )
    labels.add_argument("--gold", default=None, help="gold label, e.g. B-/work/video/teleplay")
    labels.add_argument(
        "--soft-scope",
        choices=SCOPES,
        default="paper",
        help="paper: every entity label gets a score; related: only those sharing the segment tag "
        "or a level at the same depth (the authors' code) (default: paper)",
    )
    labels.add_argument(
        "--json",
        action="store_true",
        default=False,
        help="print JSON: the label space and statistics, or with --gold an object label -> score",
    )
    labels.set_defaults(func=cmd_labels)

    train = commands.add_parser(
        "train",
        help="train SoftFiNE, keep the best checkpoint by dev F1, test it",
        argument_default=argparse.SUPPRESS,
    )
    train.add_argument("--config", default=None, help="YAML file of options; flags override it")
    add_config_arguments(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "evaluate", help="score a checkpoint on a dataset split", argument_default=argparse.SUPPRESS
    )
    evaluate.add_argument("--checkpoint", required=True)
    add_config_arguments(evaluate, only=DATA_FIELDS)
    evaluate.add_argument("--split", default="test", choices=["train", "dev", "test"])
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument(
        "--json",
        action="store_true",
        default=False,
        help="print one JSON object: sentences, gold_entities, precision, recall, f1, per_category, ...",
    )
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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
