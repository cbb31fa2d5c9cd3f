"""The configuration of a training run: `TrainConfig`, typed and validated when it is made.

One type travels end to end: flags, `--config` YAML files and the search's presets all become a
`TrainConfig`, and a search trial is that config with its grid point's values replaced
(`dataclasses.replace`). pydantic checks every value against its declared type and range in
strict mode: `"false"` is not a bool, `1.5` is not an epoch count, `inf` is not a number.

Some defaults depend on the encoder. A pretrained BERT is fine-tuned with the paper's settings
(Appendix C, Weibo); the offline `tiny` encoder is trained from scratch and needs its own (a
larger learning rate and batch, more epochs). Those fields default to None, "the encoder's
default", and are filled in when the config is made.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from .data import SCHEMES
from .errors import ConfigError, SoftFiNEError

# The paper's searched hyperparameters (its grid search over the loss weights and soft labels)
SEARCHED = ("alpha_aug", "alpha_fea", "beta", "gamma")
# Which candidate labels get a soft score (labels.py): every entity label, or only related ones
SCOPES = ("paper", "related")
METRIC = "best_dev_f1"  # what a run reports and a search selects by: its best dev F1 (train.py)
# A run's files in its output directory (train.py)
METRICS_FILE = "metrics.jsonl"  # one line per evaluation
TEST_METRICS_FILE = "test_metrics.json"  # the best checkpoint's test scores
MAX_TOKENS = 512  # BERT's position embeddings: the longest window, [CLS] and [SEP] included

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Count = Annotated[int, Field(ge=1)]

# The encoder-dependent defaults: fine-tuning a pretrained BERT (the paper's Weibo settings) and
# training the tiny encoder from scratch (measured in benchmarks/tiny_resume.py; see benchmarks/README.md).
FINE_TUNING = dict(
    epochs=12, batch_size=4, lr=2e-5, weight_decay=0.1, warmup_ratio=0.1, dropout=0.5, schedule="linear"
)
FROM_SCRATCH = dict(
    epochs=20, batch_size=32, lr=2e-3, weight_decay=0.01, warmup_ratio=0.1, dropout=0.1, schedule="onecycle"
)
# after warm-up: linear or cosine decay (transformers.get_scheduler), or torch's OneCycleLR (a cosine
# warm-up from lr/25 and a cosine anneal, what the tiny encoder trains best with)
SCHEDULES = ("linear", "cosine", "onecycle", "constant_with_warmup")
ATTENTION = ("auto", "efficient", "cudnn", "math")  # scaled-dot-product kernels on CUDA (device.py)


def encoder_defaults(model: str) -> dict:
    return FROM_SCRATCH if model == "tiny" else FINE_TUNING


def option(default: Any, help: str):
    """A config field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(config=ConfigDict(strict=True, allow_inf_nan=False, validate_assignment=True, extra="forbid"))
class TrainConfig:
    """Everything a run depends on."""

    dataset: str | None = option(
        None,
        "a built-in dataset (weibo, resume, ontonotes4, fine) or a folder of "
        "your own files: train, dev (or validation), test; JSON lines with tokens and "
        "ner_tags, two-column character files or span JSON lines (default: weibo, unless "
        "--train-file is given)",
    )
    data_dir: str | None = option(
        None, "data directory (default: $SOFTFINE_DATA_DIR, else ~/.cache/softfine/data)"
    )
    train_file: str | None = option(None, "your training file, instead of --dataset (as run_ner.py names it)")
    validation_file: str | None = option(None, "your dev file, with --train-file")
    test_file: str | None = option(None, "your test file, with --train-file")
    tag_scheme: Literal[SCHEMES] | None = option(
        None, "tagging scheme of your files: bio, bioes or bmes (default: detected from the tags)"
    )
    dev_fraction: Annotated[float, Field(gt=0, lt=1)] | None = option(
        None, "data without a dev split: carve this fraction of train as dev (seed --dev-seed)"
    )
    dev_seed: Annotated[int, Field(ge=0, lt=2**32)] = option(
        0,
        "seed of --dev-fraction's draw (not --seed, so that "
        "every training seed is scored on the same dev sentences)",
    )
    model: str = option(
        "bert-base-chinese",
        "encoder: a Hugging Face name, a local directory, or tiny "
        "(a small offline BERT with a character vocabulary from the training split)",
    )
    epochs: Count | None = option(None, "training epochs")
    batch_size: Count | None = option(None, "sentences per batch")
    lr: Positive | None = option(None, "peak learning rate (AdamW)")
    weight_decay: NonNegative | None = option(None, "AdamW weight decay (the paper's 'decay rate')")
    warmup_ratio: Fraction | None = option(None, "fraction of the training steps spent in warm-up")
    schedule: Literal[SCHEDULES] | None = option(
        None, "learning-rate schedule after warm-up: " + ", ".join(SCHEDULES)
    )
    dropout: Fraction | None = option(None, "dropout before the linear classifier")
    tiny_layers: Count = option(2, "tiny encoder: transformer layers")
    tiny_hidden: Annotated[int, Field(ge=64, multiple_of=64)] = option(
        192, "tiny encoder: hidden size (a multiple of 64; heads of 64)"
    )
    max_grad_norm: Positive = option(1.0, "gradient clipping norm")
    seed: Annotated[int, Field(ge=0, lt=2**32)] = option(42, "random seed")
    alpha_aug: NonNegative = option(0.01, "weight of the augmented-sentence loss (alpha_aug)")
    alpha_fea: NonNegative = option(0.01, "weight of the KL feature loss (alpha_fea)")
    beta: Annotated[float, Field(gt=1)] = option(
        3.0, "soft-label base, > 1: relevance = 1 / beta^(miss + gamma * wrong)"
    )
    gamma: Positive = option(2.0, "soft-label penalty of a wrong component, > 0")
    soft_scope: Literal[SCOPES] = option(
        "paper",
        "which candidates get a soft score: paper (every "
        "entity label, the paper's text) or related (only labels "
        "sharing the segment tag or a level at the same depth with "
        "the gold, the authors' released code)",
    )
    soft: bool = option(True, "soft labels; --no-soft trains with one-hot cross-entropy (ablation)")
    aug: bool = option(True, "entity augmentation; --no-aug drops it and the feature loss (ablation)")
    limit_train: Count | None = option(None, "use only the first N training sentences")
    limit_eval: Count | None = option(None, "use only the first N dev and test sentences")
    eval_every: Annotated[int, Field(ge=0)] = option(
        0, "evaluate on dev every N steps (0: after every epoch)"
    )
    out: str = option("runs/softfine", "output directory (best/ checkpoint, state/, metrics.jsonl)")
    label_separator: str | None = option(
        None,
        "splits categories into hierarchy levels (default: '/' when "
        "every category starts with '/', as FiNE's, else one level; e.g. '.' "
        "splits Weibo's PER.NAM)",
    )
    max_length: Annotated[int, Field(ge=8, le=MAX_TOKENS)] = option(
        MAX_TOKENS, "tokens per window, [CLS] and [SEP] included; longer sentences are split"
    )
    strict: bool = option(False, "make every data problem an error instead of a repaired or skipped sentence")
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = option(
        "auto", "auto, cpu, cuda or cuda:N (bf16 autocast on CUDA)"
    )
    log_every: Annotated[int, Field(ge=0)] = option(
        50, "training steps between progress lines (the only times a step waits to read the loss)"
    )
    pad_multiple: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = option(
        None,
        "pad each batch to a multiple of N tokens and to full rows, so a GPU sees a few shapes; 0 pads to "
        "the batch's longest window (default: 64 on CUDA or with --compile, else 0)",
    )
    attention: Literal[ATTENTION] = option(
        "auto",
        "attention kernel on CUDA: auto (memory-efficient; cuDNN's builds a plan per new shape), "
        "efficient, cudnn or math",
    )
    compile: bool = option(
        False,
        "torch.compile the training step (CUDA graphs on CUDA); off until measured "
        "to pay on a GPU, see docs/training.md",
    )

    def __post_init__(self) -> None:
        for name, value in encoder_defaults(self.model).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.dataset is None and not self.data_files():
            self.dataset = "weibo"

    def data_files(self) -> dict[str, str]:
        """The files given instead of --dataset: flag -> path."""
        return {
            f"--{k.replace('_', '-')}": v
            for k, v in (
                ("train_file", self.train_file),
                ("validation_file", self.validation_file),
                ("test_file", self.test_file),
            )
            if v is not None
        }

    def tiny_shape(self) -> dict:
        """BertConfig fields of the tiny encoder."""
        return dict(
            hidden_size=self.tiny_hidden,
            num_hidden_layers=self.tiny_layers,
            num_attention_heads=self.tiny_hidden // 64,
            intermediate_size=4 * self.tiny_hidden,
        )


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# Where a run's data comes from: the flags every command that reads data takes (datasets.load_corpus).
DATA_FIELDS = (
    "dataset",
    "data_dir",
    "train_file",
    "validation_file",
    "test_file",
    "tag_scheme",
    "dev_fraction",
    "dev_seed",
    "strict",
)


def make_config(
    values: Mapping[str, Any],
    where: Callable[[str], str] = lambda key: f"--{key.replace('_', '-')}",
    base: TrainConfig | None = None,
) -> TrainConfig:
    """`TrainConfig(**values)` (or `base` with `values` replaced); an unknown key or an invalid
    value is a ConfigError naming it: `where(key)` says where it came from (a flag, a file)."""
    from .datasets import get_spec

    unknown = [k for k in values if k not in FIELDS]
    if unknown:
        raise ConfigError(f"{where(unknown[0])}: unknown option {unknown[0]!r} (known: {', '.join(FIELDS)})")
    if base is not None:
        base_values = dataclasses.asdict(base)
        # a new encoder: its own defaults, not the old one's
        if values.get("model", base.model) != base.model:
            for name, default in encoder_defaults(base.model).items():
                if base_values[name] == default:
                    base_values[name] = None
        values = {**base_values, **values}
    try:
        config = TrainConfig(**values)
    except ValidationError as err:
        raise validation_error(err, where) from None
    if config.dataset is not None and config.data_files():
        raise ConfigError(
            f"{where('dataset')} {config.dataset} and {next(iter(config.data_files()))}: give a dataset "
            "(a built-in name or a folder) or your files, not both"
        )
    bare = config.dataset is not None and not any(c in config.dataset for c in "/\\.~")
    if bare and not Path(config.dataset).is_dir():
        try:
            # a mistyped name, before any data is read; a folder is looked at when read
            get_spec(config.dataset)
        except SoftFiNEError as err:
            raise ConfigError(f"{where('dataset')}: {err}, or a folder of your own files") from None
    return config


def validation_error(err: ValidationError, where: Callable[[str], str]) -> ConfigError:
    first = err.errors()[0]
    key = str(first["loc"][0]) if first["loc"] else "?"
    got = first.get("input")
    if first["type"] == "string_pattern_mismatch" and key == "device":
        return ConfigError(f"{where(key)}: expected auto, cpu, cuda or cuda:N (got {got!r})")
    shown = f" (got {got!r}: {type(got).__name__})" if not isinstance(got, (dict, tuple)) else ""
    return ConfigError(f"{where(key)}: {first['msg']}{shown}")


# ---------------------------------------------------------------------------------------------
# YAML: YAML 1.2 numbers (PyYAML follows YAML 1.1, where `1e-3` is a string), no nulls.


class DuplicateKey(Exception):
    def __init__(self, first: tuple, line: int, key):
        same = (
            f"key {key!r} is written twice"
            if key == first[0]
            else f"keys {first[0]!r} and {key!r} name one option"
        )
        super().__init__(f"{same} (lines {first[1]} and {line}); keep one")


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # PyYAML keeps the last of a key written twice; a config that says two things is refused.
            # `-` and `_` spell one option; keys merged in with `<<` may be overridden.
            seen = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)
                    name = key.replace("-", "_") if isinstance(key, str) else key
                    if name in seen:
                        raise DuplicateKey(seen[name], key_node.start_mark.line + 1, key)
                    seen[name] = (key, key_node.start_mark.line + 1)
            return super().construct_mapping(node, deep)

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def read_yaml(path: str | Path, what: str = "--config") -> dict:
    """A YAML mapping from `path`; an unreadable file, bad YAML (with its line) or a null value is
    a ConfigError naming the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{what} {path}: cannot read it ({getattr(err, 'strerror', None) or err})"
        ) from None
    try:
        values = yaml.load(text, Loader=_yaml_loader()) or {}
    except DuplicateKey as err:
        raise ConfigError(f"{what} {path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{what} {path}{line}: not valid YAML ({getattr(err, 'problem', None) or err})"
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of option: value, got {type(values).__name__}")
    return values


def config_values(values: Mapping[str, Any], path: str | Path, what: str = "--config") -> dict:
    """Option names of a YAML mapping with `-` read as `_`; a null or an empty string is refused
    (leave the key out to get the default)."""
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if value is None:
            raise ConfigError(
                f"{what} {path}: key {key!r} is null; give a value or leave the key out for the default"
            )
        if isinstance(value, str) and not value:  # data_dir: "" is not "the default data directory"
            raise ConfigError(
                f"{what} {path}: key {key!r} is '' (empty); give a value or leave the key out for the default"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{what} {path}: key {key!r}: {value} is not a finite number")
        out[name] = value
    return out


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file, with `overrides` (flags) on top."""
    path = Path(path)
    values = config_values(read_yaml(path), path)
    flags = dict(overrides or {})
    where = lambda key: f"--{key.replace('_', '-')}" if key in flags else f"--config {path}: key {key!r}"  # noqa: E731
    return make_config({**values, **flags}, where)
