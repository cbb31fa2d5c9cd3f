"""The model: a transformers encoder, dropout and one linear layer over the label space.

Encoders come from a Hugging Face name or local directory (the paper uses `bert-base-chinese`),
or are `tiny`: a small randomly initialised BERT built offline, its vocabulary the characters of
the training split, for CPU runs and tests. The augmentation tokens `[B] [I] [E] [S]` are added to
every tokenizer and the embeddings resized to match.

A checkpoint directory holds `model.safetensors` (the whole model), `config.json` (the encoder's
config), the tokenizer files, `labels.json` (the label space) and `train_config.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .labels import LabelSpace

log = logging.getLogger(__name__)

AUG_TOKENS = ("[B]", "[I]", "[E]", "[S]")
TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused1]")


class SoftFiNEModel(nn.Module):
    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features, logits): the encoder's last hidden states and the label scores."""
        features = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return features, self.classifier(self.dropout(features))


def tiny_tokenizer(chars: Iterable[str]):
    """A BERT-style tokenizer whose vocabulary is the given characters (lower-cased)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TINY_SPECIALS)}
    for char in sorted({c.lower() for c in chars if c.strip()}):
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def random_encoder(chars: Iterable[str], shape: dict | None = None) -> tuple[object, nn.Module]:
    """(tokenizer, encoder): a character tokenizer over `chars` and a randomly initialised BERT of
    the given shape (BertConfig fields; None is BertConfig's default, bert-base-chinese's shape)."""
    from transformers import BertConfig, BertModel

    tokenizer = tiny_tokenizer(chars)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **(shape or {}))
    return tokenizer, BertModel(config, add_pooling_layer=False)


def load_encoder(name: str, train_chars: Iterable[str] = (), tiny_shape: dict | None = None) -> tuple[object, nn.Module]:
    """(tokenizer, encoder) for `name`: a hub name, a local directory, or "tiny" (of `tiny_shape`,
    BertConfig fields); the augmentation tokens are added to the tokenizer and the embeddings resized."""
    from transformers import AutoModel, AutoTokenizer

    if name == "tiny":
        tokenizer, encoder = random_encoder(train_chars, tiny_shape)
        return add_aug_tokens(tokenizer, encoder, mean_resizing=False)  # random weights: no mean to keep
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            encoder = AutoModel.from_pretrained(name, add_pooling_layer=False)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"--model {name}: cannot load this encoder ({first}); give a Hugging Face "
                              "name that is reachable or cached, a local directory, or `tiny`") from None
    return add_aug_tokens(tokenizer, encoder)


def add_aug_tokens(tokenizer, encoder: nn.Module, mean_resizing: bool = True) -> tuple[object, nn.Module]:
    """`[B] [I] [E] [S]` as special tokens (never split, never lower-cased), embeddings resized."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(AUG_TOKENS)})
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)
    return tokenizer, encoder


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


def save_checkpoint(directory: str | Path, model: SoftFiNEModel, tokenizer, labels: LabelSpace,
                    train_config: dict) -> Path:
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    model.encoder.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "labels.json").write_text(labels.to_json(), encoding="utf-8")
    (directory / "train_config.json").write_text(json.dumps(train_config, indent=1, ensure_ascii=False),
                                                 encoding="utf-8")
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, label space, train config) of a checkpoint directory, model in eval mode.

    Everything is read without unpickling (safetensors and JSON); a missing or damaged file is a
    ConfigError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModel, AutoTokenizer
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
        dropout = float(train_config.get("dropout") or 0.0)
    except (OSError, ValueError, AttributeError, TypeError) as err:
        raise damaged("train_config.json", err) from None
    try:
        model_type = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"model_type {model_type!r} is not one this transformers {transformers_version} knows")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(directory), add_pooling_layer=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise damaged("config.json or the tokenizer files", err) from None
    model = SoftFiNEModel(encoder, len(labels), dropout)
    try:
        load_model(model, str(directory / "model.safetensors"), device=str(device))
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:  # RuntimeError: shapes that differ
        raise damaged("model.safetensors", err) from None
    return model.to(device).eval(), tokenizer, labels, train_config
