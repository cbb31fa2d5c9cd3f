"""How many members of a fused group fit a GPU: one training step's peak memory, measured.

`member_memory(config)` runs one training step (forward, backward, AdamW) of a group of one and of
a group of two members of `config`, on the longest batch training can see (its `batch_size`
longest training sentences, padded as training pads them), and returns each step's peak CUDA
memory. The difference is what one more member costs (its weights, gradients, AdamW moments,
activations); the rest is what a group costs once. `members_that_fit` turns that into K for a
memory budget. The search's `--fuse auto` runs this in a Ray task that holds one trial's GPU.
"""

from __future__ import annotations

import torch

from .batches import collate, encode
from .config import TrainConfig
from .datasets import Corpus, load_corpus
from .device import attention_kernels, autocast, pad_multiple, resolve_device
from .errors import ConfigError
from .fused import FusedModel, uses_augmentation
from .model import CharIds
from .optim import build_optimizer
from .train import label_space, new_encoder


def member_memory(config: TrainConfig, corpus: Corpus | None = None) -> dict:
    """{"one": bytes, "two": bytes, "each_more": bytes}: the peak CUDA memory of a training step
    of one member of `config` and of two, over what was allocated before."""
    device = resolve_device(config.device)
    if device.type != "cuda":
        raise ConfigError(f"device {device}: a fused group's memory is measured on a CUDA device")
    corpus = corpus or load_corpus(config, ["train"])
    labels = label_space(corpus, config)
    tokenizer, model = new_encoder(config, labels, corpus)  # as train_group makes it
    model.to(device)
    sentences = corpus.splits["train"]
    examples = encode(sentences, CharIds(tokenizer), labels, config.max_length)
    longest = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)[: config.batch_size]
    batch = collate(
        longest,
        pad_multiple(config.pad_multiple, device, config.compile),
        config.batch_size,
        config.max_length,
    )
    tensors = [batch[k].to(device) for k in ("input_ids", "aug_ids", "attention_mask", "label_ids")]
    table = (
        labels.soft_targets(config.beta, config.gamma, config.soft_scope)
        if config.soft
        else labels.one_hot_targets()
    ).to(device)
    peaks = {}
    for size in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fused = FusedModel([model] * size)  # the members' own stacked weights, as train_group makes them
        optimizer = build_optimizer(fused.params, config)
        alphas = [
            torch.full((size,), getattr(config, name), device=device) for name in ("alpha_aug", "alpha_fea")
        ]
        loss = fused.loss(table.expand(size, -1, -1), uses_augmentation(config), *alphas)
        with attention_kernels(device, "math" if size > 1 else config.attention), autocast(device):
            parts = loss(*tensors)
        parts["loss"].sum().backward()
        optimizer.step()  # AdamW's moments exist from the first step on
        torch.cuda.synchronize(device)
        peaks[size] = torch.cuda.max_memory_allocated(device) - before
        del fused, optimizer, loss, parts
    return {"one": peaks[1], "two": peaks[2], "each_more": max(peaks[2] - peaks[1], 1)}


def members_that_fit(budget: int, memory: dict, most: int) -> int:
    """The most members (at least 1, at most `most`) whose step fits `budget` bytes, from
    `member_memory`'s figures: what a group costs once, plus each member's share."""
    once = max(memory["one"] - memory["each_more"], 0)
    return max(1, min(most, int((budget - once) // memory["each_more"])))
