"""The model: a Hugging Face token-classification model, i.e. an encoder, dropout and one linear
layer over the label space (`BertForTokenClassification` for BERT encoders), whose forward also
returns the encoder's features for the feature loss.

Encoders come from a Hugging Face name or local directory (the paper uses `bert-base-chinese`),
or are `tiny`: a small randomly initialised BERT built offline, its vocabulary the characters of
the training split, for CPU runs and tests. The augmentation tokens `[B] [I] [E] [S]` are added to
every tokenizer and the embeddings resized to match.

A checkpoint directory is a standard token-classification model (`model.safetensors`,
`config.json` with `id2label`, the tokenizer files), so `transformers.pipeline("token-classification",
model=DIR)` loads it, plus `labels.json` (the label space) and `train_config.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import ConfigError, StorageError
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def label_fields(labels: LabelSpace, dropout: float) -> dict:
    """The config fields that make a token-classification head over `labels`."""
    names = labels.labels
    return dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                classifier_dropout=dropout)


def random_model(chars: Iterable[str], labels: LabelSpace, dropout: float, shape: dict | None = None):
    """(tokenizer, model): a character tokenizer over `chars` and a randomly initialised
    BertForTokenClassification of the given shape (BertConfig fields; None is BertConfig's
    default, bert-base-chinese's shape), with the augmentation tokens."""
    from transformers import BertConfig, BertForTokenClassification

    tokenizer = tiny_tokenizer(chars)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **(shape or {}),
                        **label_fields(labels, dropout))
    return add_aug_tokens(tokenizer, BertForTokenClassification(config), mean_resizing=False)


def build_model(name: str, labels: LabelSpace, dropout: float, train_chars: Iterable[str] = (),
                tiny_shape: dict | None = None):
    """(tokenizer, SoftFiNEModel) for encoder `name`: a hub name, a local directory, or "tiny" (of
    `tiny_shape`); the classifier is new, the augmentation tokens are added."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    if name == "tiny":
        tokenizer, net = random_model(train_chars, labels, dropout, tiny_shape)
        return tokenizer, SoftFiNEModel(net)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        net = AutoModelForTokenClassification.from_pretrained(name, **label_fields(labels, dropout))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--model {name}: cannot load this encoder ({first}); give a Hugging Face "
                          "name that is reachable or cached, a local directory, or `tiny`") from None
    if not (hasattr(net, "dropout") and hasattr(net, "classifier")):
        raise ConfigError(f"--model {name}: {type(net).__name__} has no dropout and linear classifier over the "
                          "encoder's states; use a BERT-like encoder")
    return add_aug_tokens(tokenizer, net)[0], SoftFiNEModel(net)


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


def save_checkpoint(directory: str | Path, model: SoftFiNEModel, tokenizer, labels: LabelSpace,
                    train_config: dict) -> Path:
    from safetensors import SafetensorError

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with no_hf_progress_bars():
            model.net.save_pretrained(directory)  # model.safetensors and config.json
        tokenizer.save_pretrained(directory)
        (directory / "labels.json").write_text(labels.to_json(), encoding="utf-8")
        (directory / "train_config.json").write_text(json.dumps(train_config, indent=1, ensure_ascii=False),
                                                     encoding="utf-8")
    except (OSError, SafetensorError) as err:  # a full disk, a folder without write permission
        reason = getattr(err, "strerror", None) or str(err).split(": ", 1)[-1]
        raise StorageError(f"{directory}: cannot write the checkpoint ({reason})") from None
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, label space, train config) of a checkpoint directory, model in eval mode.

    Everything is read without unpickling (safetensors and JSON); a missing or damaged file is a
    ConfigError naming it."""
    from safetensors import SafetensorError
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForTokenClassification, AutoTokenizer
    from transformers import __version__ as transformers_version

    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        raise ConfigError(f"--checkpoint {directory}: not a SoftFiNE checkpoint (no model.safetensors)")

    def damaged(name: str, err: BaseException) -> ConfigError:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return ConfigError(f"--checkpoint {directory}: {name} is missing or damaged ({first}); "
                           "train again or copy the checkpoint anew")

    try:
        labels = LabelSpace.from_json((directory / "labels.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise damaged("labels.json", err) from None
    try:
        train_config = json.loads((directory / "train_config.json").read_text(encoding="utf-8"))
        train_config.get("max_length")
    except (OSError, ValueError, AttributeError, TypeError) as err:
        raise damaged("train_config.json", err) from None
    try:
        model_type = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"model_type {model_type!r} is not one this transformers {transformers_version} knows")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise damaged("config.json or the tokenizer files", err) from None
    if config.num_labels != len(labels):
        raise damaged("labels.json", ValueError(f"{len(labels)} labels, but the model has {config.num_labels}"))
    try:  # use_safetensors: never a pickled pytorch_model.bin
        with no_hf_progress_bars():
            net = AutoModelForTokenClassification.from_pretrained(directory, use_safetensors=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:  # RuntimeError: shapes that differ
        raise damaged("model.safetensors", err) from None
    return SoftFiNEModel(net).to(device).eval(), tokenizer, labels, train_config
