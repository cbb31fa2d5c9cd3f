"""Evaluation and prediction: every window of a split through the model, the tags put back
per sentence, and seqeval's entity scores of the whole split (metrics.py)."""

from __future__ import annotations

import sys

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

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


@torch.no_grad()
def predict_tags(model: SoftFiNEModel, split: Split, labels: LabelSpace, device: torch.device,
                 batch_size: int = 32, multiple: int | None = None, attention: str = "auto") -> list[list[str]]:
    """The predicted tags of every sentence of `split`; `multiple`: the padding of device.py's
    `pad_multiple` (None: the device's default)."""
    model.eval()
    names = labels.labels
    predicted = [["O"] * len(s) for s in split.sentences]
    batches = eval_loader(split.examples, batch_size, pad_multiple(multiple, device))
    bar = progress(len(batches), "evaluate")
    with attention_kernels(device, attention):
        for batch in batches:
            bar.update()
            with autocast(device):
                _, logits = model(batch["input_ids"].to(device, non_blocking=True),
                                  batch["attention_mask"].to(device, non_blocking=True))
            best = logits.argmax(-1).cpu()  # one host sync a batch, outside training
            for row, number, offset, label_ids in zip(best, batch["sentence"], batch["offset"], batch["label_ids"]):
                chars = label_ids.ne(-100)  # positions of real characters
                for i, label in enumerate(row[chars].tolist()):
                    predicted[number][offset + i] = names[label]
    bar.close()
    return predicted


def evaluate(model: SoftFiNEModel, split: Split, labels: LabelSpace, device: torch.device,
             batch_size: int = 32, multiple: int | None = None, attention: str = "auto") -> dict:
    predicted = predict_tags(model, split, labels, device, batch_size, multiple, attention)
    return evaluate_tags([list(s.tags) for s in split.sentences], predicted, labels)


def flat_scores(prefix: str, scores: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in scores.items() if k != "per_category"}
