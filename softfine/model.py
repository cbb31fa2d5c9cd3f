"""The model: a Hugging Face token-classification model, i.e. an encoder, dropout and one linear
layer over the label space (`BertForTokenClassification` for BERT encoders), whose forward also
returns the encoder's features for the feature loss.

Encoders come from a Hugging Face name or local directory (the paper uses `bert-base-chinese`),
or are `tiny`: a small randomly initialised BERT built offline, its vocabulary the characters of
the training split, for CPU runs and tests. The augmentation tokens `[B] [I] [E] [S]` are added to
every tokenizer and the embeddings resized to match.

A checkpoint directory is a standard token-classification model (`model.safetensors`,
`config.json` with `id2label`, the tokenizer files), so `transformers.pipeline("token-classification",
model=DIR, aggregation_strategy="simple")` loads it and finds the entities `softfine predict` finds
(its `id2label` names BIOES labels by the B-/I- prefixes the pipeline reads), plus `labels.json`
(the label space, BIOES) and `train_config.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pickle  # only for its exception: torch's safe loader raises pickle.UnpicklingError
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from .config import MAX_TOKENS
from .errors import ConfigError, StorageError, first_line
from .labels import LabelSpace

log = logging.getLogger(__name__)

AUG_TOKENS = ("[B]", "[I]", "[E]", "[S]")
TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused1]")


class SoftFiNEModel(nn.Module):
    """Wraps a token-classification model `net` (with `.dropout` and `.classifier`, as BERT-like
    ones have) to return the encoder's last hidden states next to the label scores."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def encoder(self) -> nn.Module:
        return self.net.base_model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features, logits): the encoder's last hidden states and the label scores."""
        # The mask as SDPA takes it, (batch, 1, 1, length): from the 2D mask transformers would
        # first ask whether any position is padding, which makes a GPU step wait for the host.
        mask = attention_mask[:, None, None, :].bool()
        features = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return features, self.net.classifier(self.net.dropout(features))


def tiny_tokenizer(chars: Iterable[str]):
    """A BERT-style tokenizer whose vocabulary is the given characters (lower-cased)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TINY_SPECIALS)}
    for char in sorted({c.lower() for c in chars if c.strip()}):
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]  # as BERT's tokenizer frames a text, so that pipelines do too
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return one_token_per_character(
        PreTrainedTokenizerFast(
            tokenizer_object=backend,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    )


def one_token_per_character(tokenizer):
    """The tokenizer, made to cut a text into single characters after its own pre-tokenization.

    The model sees one token per character (CharIds); a pipeline given the saved checkpoint
    tokenizes whole texts, where WordPiece would make `1963` or `MBA` one token (or `[UNK]`). With
    every character a word of its own, the pipeline's tokens are CharIds' (whitespace aside, which
    the pipeline drops). A single character is tokenized as before, so training is unchanged."""
    from tokenizers import Regex, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: the pipeline tokenizes as it does
        return tokenizer
    split = pre_tokenizers.Split(Regex(r"\S"), behavior="isolated")
    backend.pre_tokenizer = (
        split if backend.pre_tokenizer is None else pre_tokenizers.Sequence([backend.pre_tokenizer, split])
    )
    return tokenizer


# transformers' token-classification pipeline groups tokens into entities by B-/I- prefixes alone
# (TokenClassificationPipeline.get_tag and group_entities): a B- token begins an entity, an I- token
# of the same category continues it, anything else is read as I-. So the config names an S-X class
# B-X (a one-character entity begins) and an E-X class I-X (the entity goes on); two S-X in a row
# are then B-X B-X, two entities, as they should be. labels.json keeps the project's BIOES labels.
PIPELINE_SEGMENT = {"B": "B", "S": "B", "I": "I", "E": "I"}


def pipeline_label(label: str) -> str:
    """The name of a BIOES label in the exported config's id2label, which the pipeline reads."""
    if label == "O":
        return label
    segment, _, category = label.partition("-")
    return f"{PIPELINE_SEGMENT[segment]}-{category}"


def label_fields(labels: LabelSpace, dropout: float) -> dict:
    """The config fields that make a token-classification head over `labels`: id2label in the
    names the pipeline's aggregation reads (several ids may share a name), label2id from the
    project's own labels (one id each, as in labels.json)."""
    names = labels.labels
    return dict(
        num_labels=len(names),
        id2label={i: pipeline_label(n) for i, n in enumerate(names)},
        label2id={n: i for i, n in enumerate(names)},
        classifier_dropout=dropout,
    )


def random_model(chars: Iterable[str], labels: LabelSpace, dropout: float, shape: dict | None = None):
    """(tokenizer, model): a character tokenizer over `chars` and a randomly initialised
    BertForTokenClassification of the given shape (BertConfig fields; None is BertConfig's
    default, bert-base-chinese's shape), with the augmentation tokens."""
    from transformers import BertConfig, BertForTokenClassification

    tokenizer = tiny_tokenizer(chars)
    config = BertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_TOKENS,
        **(shape or {}),
        **label_fields(labels, dropout),
    )
    return add_aug_tokens(tokenizer, BertForTokenClassification(config), mean_resizing=False)


def build_model(
    name: str,
    labels: LabelSpace,
    dropout: float,
    train_chars: Iterable[str] = (),
    tiny_shape: dict | None = None,
):
    """(tokenizer, SoftFiNEModel) for encoder `name`: a hub name, a local directory, or "tiny" (of
    `tiny_shape`); the classifier is new, the augmentation tokens are added."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    if name == "tiny":
        tokenizer, net = random_model(train_chars, labels, dropout, tiny_shape)
        return tokenizer, SoftFiNEModel(net)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        with no_hf_progress_bars(), warnings.catch_warnings():
            # torch's safe loader warns of the pickle protocol before it refuses the file
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            net = AutoModelForTokenClassification.from_pretrained(name, **label_fields(labels, dropout))
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met an object that is not a tensor
        raise ConfigError(
            f"--model {name}: its pytorch_model.bin holds Python objects besides tensors, and "
            "nothing read from disk is unpickled; give an encoder saved as model.safetensors"
        ) from None
    except Exception as err:  # noqa: BLE001 - whatever transformers, tokenizers or safetensors raise:
        # the folder or name cannot be used, and the error says why
        raise ConfigError(
            f"--model {name}: cannot load this encoder ({first_line(err)}); give a Hugging Face "
            "name that is reachable or cached, a local directory, or `tiny`"
        ) from err
    if not (hasattr(net, "dropout") and hasattr(net, "classifier")):
        raise ConfigError(
            f"--model {name}: {type(net).__name__} has no dropout and linear classifier over the "
            "encoder's states; use a BERT-like encoder"
        )
    return add_aug_tokens(one_token_per_character(tokenizer), net)[0], SoftFiNEModel(net)


def check_encoder(name: str) -> None:
    """What every run of encoder `name` loads first, its config and tokenizer, loaded once (no
    weights): a name that is mistyped, not on a reachable Hub or not in its cache is a ConfigError
    naming --model and what to do."""
    from transformers import AutoConfig, AutoTokenizer

    if name == "tiny":
        return
    try:
        with no_hf_progress_bars():
            AutoConfig.from_pretrained(name)
            AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - whatever transformers or huggingface_hub raise: it cannot be loaded
        raise ConfigError(
            f"--model {name}: cannot load its config and tokenizer ({first_line(err)}); give a local copy "
            "(--model /path/to/encoder), or run where the Hugging Face Hub is reachable, or with it in "
            "the Hub's cache and HF_HUB_OFFLINE=1"
        ) from None


def add_aug_tokens(tokenizer, net: nn.Module, mean_resizing: bool = True) -> tuple[object, nn.Module]:
    """`[B] [I] [E] [S]` as special tokens (never split, never lower-cased), embeddings resized."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(AUG_TOKENS)})
    net.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)
    return tokenizer, net


class CharIds:
    """Maps characters to token ids, one token per character, whatever the tokenizer would do
    with spaces, digits or Latin letters: a character the tokenizer drops becomes `[unused1]`
    (BERT's customary space token) or `[UNK]`, and one it splits keeps its first piece."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.blank = vocab.get("[unused1]", tokenizer.unk_token_id)
        self.cache: dict[str, int] = {}

    def __call__(self, chars: Sequence[str]) -> list[int]:
        ids = []
        for char in chars:
            if char not in self.cache:
                pieces = self.tokenizer.tokenize(char)
                self.cache[char] = self.tokenizer.convert_tokens_to_ids(pieces[0]) if pieces else self.blank
            ids.append(self.cache[char])
        return ids


@contextlib.contextmanager
def no_hf_progress_bars():
    """transformers draws a bar for every local save and load: noise in logs, none on a terminal."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def hf_errors_only():
    """transformers' warnings off while the block runs (the caller reports what matters)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def save_checkpoint(
    directory: str | Path, model: SoftFiNEModel, tokenizer, labels: LabelSpace, train_config: dict
) -> Path:
    from safetensors import SafetensorError

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with no_hf_progress_bars():
            model.net.save_pretrained(directory)  # model.safetensors and config.json
        tokenizer.save_pretrained(directory)
        (directory / "labels.json").write_text(labels.to_json(), encoding="utf-8")
        (directory / "train_config.json").write_text(
            json.dumps(train_config, indent=1, ensure_ascii=False), encoding="utf-8"
        )
    except (OSError, SafetensorError) as err:  # a full disk, a folder without write permission
        reason = getattr(err, "strerror", None) or str(err).split(": ", 1)[-1]
        raise StorageError(f"{directory}: cannot write the checkpoint ({reason})") from None
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, label space, train config) of a checkpoint directory, model in eval mode.

    Everything is read without unpickling (safetensors and JSON); a missing or damaged file is a
    ConfigError naming it."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        raise ConfigError(f"--checkpoint {directory}: not a SoftFiNE checkpoint (no model.safetensors)")
    damaged = _damaged(directory)
    try:
        labels = LabelSpace.from_json((directory / "labels.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise damaged("labels.json", err) from None
    try:
        train_config = read_train_config(directory / "train_config.json")
    except ConfigError as err:
        raise damaged("train_config.json", str(err)) from None
    except (OSError, ValueError) as err:
        raise damaged("train_config.json", err) from None
    _check_model_config(directory, labels, damaged)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise damaged("the tokenizer files", err) from err
    try:  # use_safetensors: never a pickled pytorch_model.bin
        with no_hf_progress_bars(), hf_errors_only():  # its load report: the check below says it in one line
            net, info = AutoModelForTokenClassification.from_pretrained(
                directory, use_safetensors=True, output_loading_info=True
            )
    except Exception as err:  # noqa: BLE001 - SafetensorError, RuntimeError (shapes that differ), ...
        raise damaged("model.safetensors", err) from err
    # transformers fills weights the file lacks with random ones, with a warning: not a trained model
    lacking = info["missing_keys"] or [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
    if lacking:
        raise damaged(
            "model.safetensors",
            f"{len(lacking)} weights missing or of another shape, e.g. {sorted(lacking)[0]}",
        )
    return SoftFiNEModel(net).to(device).eval(), tokenizer, labels, train_config


def _damaged(directory: Path):
    """damaged(file, why): the ConfigError for a checkpoint's missing or damaged file."""

    def damaged(name: str, err: BaseException | str) -> ConfigError:
        why = err if isinstance(err, str) else first_line(err)
        return ConfigError(
            f"--checkpoint {directory}: {name} is missing or damaged ({why}); "
            "train again or copy the checkpoint anew"
        )

    return damaged


def _check_model_config(directory: Path, labels: LabelSpace, damaged) -> None:
    """config.json: a model type transformers knows, and labels.json's labels, in order."""
    from transformers import CONFIG_MAPPING, AutoConfig
    from transformers import __version__ as transformers_version

    try:
        model_type = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"model_type {model_type!r} is not one this transformers {transformers_version} knows"
            )
        config = AutoConfig.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a damaged file
        raise damaged("config.json", err) from err
    if config.num_labels != len(labels):
        raise damaged("labels.json", f"{len(labels)} labels, but the model has {config.num_labels}")
    # The label space is labels.json's; config.json must name the same labels, in the pipeline's
    # names (or, from checkpoints saved before them, the project's own).
    named = [config.id2label.get(i) for i in range(len(labels))]
    if named not in ([pipeline_label(n) for n in labels.labels], labels.labels):
        wrong = next(i for i, n in enumerate(named) if n != pipeline_label(labels.labels[i]))
        raise damaged(
            "labels.json or config.json",
            f"label {wrong} is {labels.labels[wrong]!r} in labels.json but {named[wrong]!r} in config.json",
        )


def read_train_config(path: Path) -> dict:
    """A checkpoint's train_config.json, its values checked as a TrainConfig's (strict types and
    ranges, config.py), as a dict of every option (the defaults filled in). A bad value is a
    ConfigError naming the key.

    Keys this version does not know (another version's options) are left out, with a warning: the
    saved model does not depend on them, so a checkpoint stays usable across versions. Neither is
    the data looked for (make_config's checks): it may have moved since the run was trained."""
    from .config import FIELDS, TrainConfig, validation_error

    values = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise ConfigError(f"expected a mapping of option: value, got {type(values).__name__}")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        log.warning("%s: options this version does not know, left out: %s", path, ", ".join(unknown))
    try:
        return dataclasses.asdict(TrainConfig(**{k: v for k, v in values.items() if k in FIELDS}))
    except ValidationError as err:
        raise validation_error(err, lambda key: f"key {key!r}") from None
