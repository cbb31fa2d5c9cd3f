"""The training loop: data once, batches grouped by length, AdamW with warm-up and decay, dev
evaluation every epoch (or every k steps), the best checkpoint by dev F1, then test.

`train(config, on_evaluate)` is what callers drive: the CLI, and the Ray Tune trainable, which
reports each evaluation and checkpoints the output directory through `on_evaluate`.

The output directory (`config.out`):
    best/               the best checkpoint so far (model.safetensors, tokenizer, labels.json, ...)
    state/              the latest evaluation's full state, to resume from (weights, optimizer, ...)
    metrics.jsonl       one line per evaluation
    test_metrics.json   the best checkpoint's test scores, at the end
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from .batches import Split, encode, load_splits, train_loader
from .config import TrainConfig
from .data import categories
from .datasets import available_splits, dataset_files, sha256_of
from .device import attention_kernels, autocast, compile_step, pad_multiple, resolve_device
from .errors import ConfigError, DataError
from .evaluate import evaluate, flat_scores, progress
from .labels import LabelSpace
from .losses import softfine_loss
from .model import CharIds, SoftFiNEModel, build_model, load_checkpoint, save_checkpoint
from .optim import TRAINING_STATE, build_optimizer, load_training_state, make_scheduler, restore, save_training_state

log = logging.getLogger(__name__)

LOSS_PARTS = ("loss", "loss_soft", "loss_aug", "loss_fea")


def train(config: TrainConfig, on_evaluate: Callable[[dict, str], None] | None = None,
          resume_from: str | os.PathLike | None = None) -> dict:
    """Train, evaluating on dev as configured; returns the best checkpoint's dev and test scores.

    `on_evaluate(metrics, out_dir)` is called after every evaluation, once `out_dir` holds the
    state to resume from and the best checkpoint so far. `resume_from` is such a directory (or
    a copy of it): training continues from its last evaluation.
    """
    from transformers import set_seed

    device = resolve_device(config.device)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file is there; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)

    splits = ["train", "dev"] + (["test"] if "test" in available_splits(config.dataset, config.data_dir) else [])
    files = dataset_files(config.dataset, config.data_dir, splits)
    sentences = load_splits(config, splits)
    if not sentences["train"]:
        raise DataError(f"{files['train']}: no usable training sentences")
    labels = LabelSpace.from_categories(
        [c for s in sentences.values() for c in categories(s)], config.separator())
    soft_table = (labels.soft_targets(config.beta, config.gamma, config.soft_scope) if config.soft
                  else labels.one_hot_targets()).to(device)

    resume_state = Path(resume_from) / "state" if resume_from else None
    if resume_state is not None:
        model, tokenizer, _, _ = load_checkpoint(resume_state, device)
        state = load_training_state(resume_state / TRAINING_STATE)
        if Path(resume_from).resolve() != out.resolve() and (Path(resume_from) / "best").is_dir():
            shutil.copytree(Path(resume_from) / "best", out / "best", dirs_exist_ok=True)
    else:
        tokenizer, model = build_model(config.model, labels, config.dropout,
                                       (c for s in sentences["train"] for c in s.chars), config.tiny_shape())
        model = model.to(device)
        state = None

    char_ids = CharIds(tokenizer)
    data = {name: Split(s, encode(s, char_ids, labels, config.max_length)) for name, s in sentences.items()}
    steps_per_epoch = math.ceil(len(data["train"].examples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = build_optimizer(model, config)
    scheduler = make_scheduler(config, optimizer, total_steps)
    step, best_f1, best_step = 0, -1.0, 0
    if state is not None:
        step, best_f1, best_step = restore(state, optimizer, scheduler)
        log.info("resumed from %s at step %d (best dev F1 so far %.4f)", resume_from, step, best_f1)

    run_config = dataclasses.asdict(config)
    data_sha256 = sha256_of([files[s] for s in splits])
    log.info("%s: %d train / %d dev / %d test sentences, %d labels, %d steps on %s",
             config.dataset, *(len(sentences.get(s, [])) for s in ("train", "dev", "test")),
             len(labels), total_steps, device)

    def evaluate_and_keep(epoch: int, running: dict) -> None:
        nonlocal best_f1, best_step
        scores = evaluate(model, data["dev"], labels, device, multiple=multiple, attention=config.attention)
        if scores["f1"] > best_f1:
            best_f1, best_step = scores["f1"], step
            save_checkpoint(out / "best", model, tokenizer, labels, run_config)
        save_checkpoint(out / "state", model, tokenizer, labels, run_config)
        save_training_state(out / "state" / TRAINING_STATE, optimizer, scheduler, step, best_f1, best_step)
        n = max(running["n"], 1)
        metrics = {"epoch": epoch, "step": step,
                   **{f"train_{k}": float(running[k]) / n for k in LOSS_PARTS},
                   **flat_scores("dev", scores), "best_dev_f1": best_f1}
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        log.info("epoch %d step %d: dev P %.4f R %.4f F1 %.4f on %d sentences, %d gold entities (best %.4f "
                 "at step %d)", epoch, step, scores["precision"], scores["recall"], scores["f1"],
                 scores["sentences"], scores["gold_entities"], best_f1, best_step)
        if on_evaluate is not None:
            model.train()
            on_evaluate(metrics, str(out))
        running.update(dict.fromkeys(running, 0.0))

    multiple = pad_multiple(config.pad_multiple, device, config.compile)
    loss = forward_loss(model, soft_table, config)
    if config.compile:
        loss = compile_step(loss, device)
    running = dict.fromkeys(LOSS_PARTS + ("n",), 0.0)
    started, seen_chars = time.perf_counter(), 0
    bar = progress(total_steps, "train", step)
    for epoch in range(step // steps_per_epoch, config.epochs):
        model.train()
        skip = step - epoch * steps_per_epoch  # batches of this epoch done before a resume
        batches = train_loader(data["train"].examples, config.batch_size, config.seed, epoch, device.type == "cuda",
                               multiple, config.max_length)
        for batch_number, batch in enumerate(batches):
            if batch_number < skip:
                continue
            with attention_kernels(device, config.attention):
                parts = train_step(loss, batch, device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for k in LOSS_PARTS:
                running[k] = running[k] + parts[k]  # tensors on the device: no host sync per step
            running["n"] += 1
            seen_chars += int(batch["label_ids"].ne(-100).sum())
            bar.update()
            if config.log_every and step % config.log_every == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(running['loss']) / max(running['n'], 1):.4f}")
                elapsed = time.perf_counter() - started
                log.info("epoch %d step %d/%d loss %.4f (%.0f chars/s, lr %.2e)", epoch + 1, step, total_steps,
                         float(running["loss"]) / max(running["n"], 1), seen_chars / elapsed, scheduler.get_last_lr()[0])
            if config.eval_every and step % config.eval_every == 0 and step % steps_per_epoch:
                evaluate_and_keep(epoch + 1, running)
        evaluate_and_keep(epoch + 1, running)
    bar.close()

    result = {"best_dev_f1": best_f1, "best_step": best_step, "best_checkpoint": str(out / "best"),
              "dev_sentences": len(data["dev"].sentences),
              "dev_gold_entities": sum(tag[0] in "BS" for s in data["dev"].sentences for tag in s.tags),
              "data_sha256": data_sha256, "train_seconds": time.perf_counter() - started}
    if "test" in data:
        best_model, *_ = load_checkpoint(out / "best", device)
        test_scores = evaluate(best_model, data["test"], labels, device, multiple=multiple, attention=config.attention)
        result.update(flat_scores("test", test_scores))
        (out / "test_metrics.json").write_text(json.dumps(test_scores, indent=1, ensure_ascii=False))
        log.info("test (best checkpoint, step %d): P %.4f R %.4f F1 %.4f on %d sentences, %d gold entities",
                 best_step, test_scores["precision"], test_scores["recall"], test_scores["f1"],
                 test_scores["sentences"], test_scores["gold_entities"])
    else:
        log.warning("%s has no test split in %s: skipped the test evaluation", config.dataset, files["train"].parent)
    return result


def forward_loss(model: SoftFiNEModel, soft_table: torch.Tensor, config: TrainConfig) -> Callable[..., dict]:
    """`loss(input_ids, aug_ids, attention_mask, label_ids)`: the forward pass and the SoftFiNE
    loss of one batch, over fixed-shape tensors with masks (nothing waits for the GPU), in one
    function that `torch.compile` can take whole. Original and augmented sentences share one
    encoder call."""
    use_aug = config.aug and (config.alpha_aug > 0 or config.alpha_fea > 0)
    alpha_aug, alpha_fea = config.alpha_aug, config.alpha_fea

    def loss(input_ids, aug_ids, attention_mask, label_ids) -> dict[str, torch.Tensor]:
        chars = label_ids.ne(-100)
        targets = soft_table[label_ids.clamp(min=0)]  # a row lookup per position
        if not use_aug:
            _, logits = model(input_ids, attention_mask)
            return softfine_loss(logits, targets, chars)
        n = input_ids.shape[0]
        features, logits = model(torch.cat([input_ids, aug_ids]), torch.cat([attention_mask, attention_mask]))
        return softfine_loss(logits[:n], targets, chars, aug_logits=logits[n:], features=features[:n],
                             aug_features=features[n:], entities=chars & label_ids.ne(0),  # label 0 is O
                             alpha_aug=alpha_aug, alpha_fea=alpha_fea)

    return loss


def train_step(loss: Callable[..., dict], batch: dict, device: torch.device) -> dict:
    """One forward and backward pass of `loss` (from `forward_loss`, compiled or not). Returns the
    loss and its parts as detached tensors on `device` (reading them syncs CUDA)."""
    # non_blocking: the copies from pinned memory overlap the GPU's work (no host sync per step)
    tensors = [batch[k].to(device, non_blocking=True) for k in ("input_ids", "aug_ids", "attention_mask", "label_ids")]
    with autocast(device):
        parts = loss(*tensors)
    parts["loss"].backward()
    return {k: v.detach() for k, v in parts.items()}
