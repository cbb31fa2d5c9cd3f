"""Evaluation and prediction: every window of a split through the model, the tags put back
per sentence, and seqeval's entity scores of the whole split (metrics.py); for one model or for
the members of a fused group (fused.py) in one pass."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from .batches import Split, eval_loader
from .device import attention_kernels, autocast, pad_multiple
from .labels import LabelSpace
from .metrics import evaluate_tags
from .model import SoftFiNEModel


def progress(total: int, desc: str, initial: int = 0):
    """A tqdm bar on an interactive terminal; nothing in Ray trials, CI or a redirected log, which
    get the log lines instead."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="batch",
        leave=False,
        dynamic_ncols=True,
        disable=not sys.stderr.isatty(),
    )


@torch.no_grad()
def predict_tags(
    model: SoftFiNEModel,
    split: Split,
    labels: LabelSpace,
    device: torch.device,
    batch_size: int = 32,
    multiple: int | None = None,
    attention: str = "auto",
) -> list[list[str]]:
    """The predicted tags of every sentence of `split`; `multiple`: the padding of device.py's
    `pad_multiple` (None: the device's default)."""
    model.eval()
    logits_of = lambda ids, mask: model(ids, mask)[1][None]  # noqa: E731 - a group of one
    return predict_group_tags(logits_of, 1, split, labels, device, batch_size, multiple, attention)[0]


@torch.no_grad()
def predict_group_tags(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    size: int,
    split: Split,
    labels: LabelSpace,
    device: torch.device,
    batch_size: int = 32,
    multiple: int | None = None,
    attention: str = "auto",
) -> list[list[list[str]]]:
    """The predicted tags of every sentence of `split` by each of `size` models (a fused group, in
    eval mode): `logits_of(input_ids, attention_mask)` gives their scores, (size, batch, length, labels)."""
    names = labels.labels
    predicted = [[["O"] * len(s) for s in split.sentences] for _ in range(size)]
    batches = eval_loader(split.examples, batch_size, pad_multiple(multiple, device))
    bar = progress(len(batches), "evaluate")
    with attention_kernels(device, attention):
        for batch in batches:
            bar.update()
            with autocast(device):
                logits = logits_of(
                    batch["input_ids"].to(device, non_blocking=True),
                    batch["attention_mask"].to(device, non_blocking=True),
                )
            best = logits.argmax(-1).cpu()  # one host sync a batch, outside training
            for member, rows in zip(predicted, best):
                for row, number, offset, label_ids in zip(
                    rows, batch["sentence"], batch["offset"], batch["label_ids"]
                ):
                    chars = label_ids.ne(-100)  # positions of real characters
                    for i, label in enumerate(row[chars].tolist()):
                        member[number][offset + i] = names[label]
    bar.close()
    return predicted


def evaluate(
    model: SoftFiNEModel,
    split: Split,
    labels: LabelSpace,
    device: torch.device,
    batch_size: int = 32,
    multiple: int | None = None,
    attention: str = "auto",
) -> dict:
    predicted = predict_tags(model, split, labels, device, batch_size, multiple, attention)
    return evaluate_tags([list(s.tags) for s in split.sentences], predicted, labels)


def evaluate_group(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    size: int,
    split: Split,
    labels: LabelSpace,
    device: torch.device,
    batch_size: int = 32,
    multiple: int | None = None,
    attention: str = "auto",
) -> list[dict]:
    """Each member's scores of the whole split (as `evaluate`'s), from one pass of the group."""
    gold = [list(s.tags) for s in split.sentences]
    return [
        evaluate_tags(gold, predicted, labels)
        for predicted in predict_group_tags(
            logits_of, size, split, labels, device, batch_size, multiple, attention
        )
    ]


def flat_scores(prefix: str, scores: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in scores.items() if k != "per_category"}
