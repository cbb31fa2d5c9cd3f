"""From sentences to batches: splits read once, encoded once (ids, augmented ids, label ids),
then batched by length.

A batch is padded to its longest window, or, with `pad_multiple` > 0 (the GPU default, see
device.py), to a multiple of `pad_multiple` tokens and to a full batch of rows, so that a run sees
a few shapes. Padding is masked everywhere (attention mask; label -100), so it changes no score.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import MAX_TOKENS
from .data import Sentence
from .labels import LabelSpace
from .model import CharIds


@dataclass
class Split:
    sentences: list[Sentence]
    examples: list[dict]  # one per window: input_ids, aug_ids, label_ids, sentence, offset


def encode(
    sentences: Sequence[Sentence],
    char_ids: CharIds,
    labels: LabelSpace,
    max_length: int,
    unknown_as_o: bool = False,
) -> list[dict]:
    """Token ids of each sentence and of its augmentation (entity characters replaced by
    [B] [I] [E] [S]), with label ids; sentences longer than a window are split into windows.
    `unknown_as_o` (scoring only, where the gold tags are the sentences' own): a tag the label
    space lacks gets O's id instead of a KeyError."""
    tokenizer = char_ids.tokenizer
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    seg_ids = {seg: tokenizer.convert_tokens_to_ids(f"[{seg}]") for seg in "BIES"}
    width = max_length - 2
    examples = []
    for number, sentence in enumerate(sentences):
        ids = char_ids(sentence.chars)
        label_ids = [labels.index(tag) if not unknown_as_o or tag in labels else 0 for tag in sentence.tags]
        aug = [seg_ids[tag[0]] if tag != "O" else i for tag, i in zip(sentence.tags, ids)]
        for offset in range(0, max(len(ids), 1), width):
            window = slice(offset, offset + width)
            examples.append(
                {
                    "input_ids": torch.tensor([cls] + ids[window] + [sep]),
                    "aug_ids": torch.tensor([cls] + aug[window] + [sep]),
                    "label_ids": torch.tensor([-100] + label_ids[window] + [-100]),
                    "sentence": number,
                    "offset": offset,
                }
            )
    return examples


def padded_length(longest: int, multiple: int, max_length: int) -> int:
    """`longest` rounded up to a multiple of `multiple` (0: unchanged), at most `max_length`."""
    if multiple <= 0:
        return longest
    return max(longest, min(-(-longest // multiple) * multiple, max_length))


def collate(examples: list[dict], multiple: int = 0, rows: int = 0, max_length: int = MAX_TOKENS) -> dict:
    """Pads a batch to `padded_length` tokens and, with `rows`, to that many rows. A padding row
    attends to its first token only (a row that attends to nothing would make NaNs) and has no
    characters, so the losses, which average over characters, are the same."""
    longest = max(len(e["input_ids"]) for e in examples)
    length, n = padded_length(longest, multiple, max_length), max(rows, len(examples))
    lengths = torch.tensor([len(e["input_ids"]) for e in examples] + [1] * (n - len(examples)))

    def pad(key: str, value: int) -> torch.Tensor:
        out = torch.full((n, length), value, dtype=torch.long)
        for i, e in enumerate(examples):
            out[i, : len(e[key])] = e[key]
        return out

    return {
        "input_ids": pad("input_ids", 0),
        "aug_ids": pad("aug_ids", 0),
        "label_ids": pad("label_ids", -100),
        "attention_mask": (torch.arange(length)[None, :] < lengths[:, None]).long(),
        "sentence": [e["sentence"] for e in examples],
        "offset": [e["offset"] for e in examples],
    }


def train_loader(
    examples: list[dict],
    batch_size: int,
    seed: int,
    epoch: int,
    pin_memory: bool = False,
    multiple: int = 0,
    max_length: int = MAX_TOKENS,
):
    """Batches of similar length (transformers' LengthGroupedSampler), reshuffled each epoch;
    `pin_memory` (for CUDA) lets the copies to the GPU run asynchronously; `multiple` > 0 pads
    every batch to a multiple of that many tokens and to `batch_size` rows."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    sampler = LengthGroupedSampler(
        batch_size, lengths=[len(e["input_ids"]) for e in examples], generator=generator
    )
    pad = functools.partial(
        collate, multiple=multiple, rows=batch_size if multiple else 0, max_length=max_length
    )
    return torch.utils.data.DataLoader(
        examples,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=pad,
        drop_last=False,
        pin_memory=pin_memory,
    )


def eval_loader(examples: list[dict], batch_size: int, multiple: int = 0, max_length: int = MAX_TOKENS):
    """Every window once, shortest first, padded as `train_loader` pads."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    pad = functools.partial(
        collate, multiple=multiple, rows=batch_size if multiple else 0, max_length=max_length
    )
    # A generator of its own: a DataLoader draws a seed from torch's global one when iterated,
    # which would shift the training's dropout masks by every evaluation.
    return torch.utils.data.DataLoader(
        [examples[i] for i in order], batch_size=batch_size, collate_fn=pad, generator=torch.Generator()
    )
