"""The training loop: data once, batches grouped by length, AdamW with warm-up and decay, dev
evaluation every epoch (or every k steps), the best checkpoint by dev F1, then test.

`train(config, on_evaluate)` is what callers drive: the CLI, and the Ray Tune trainable, which
reports each evaluation and checkpoints the output directory through `on_evaluate`.
`train_group(configs, on_evaluate)` trains runs that differ only in their loss as one fused model
(fused.py); a single run is a group of one, so both take this one loop.

The output directory (`config.out`, one per run of a group):
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
from typing import Callable, Sequence

import torch

from .batches import Split, encode, train_loader
from .config import TrainConfig
from .data import categories
from .datasets import Corpus, load_corpus, report_unseen
from .device import attention_kernels, autocast, compile_step, pad_multiple, resolve_device
from .errors import ConfigError, DataError
from .evaluate import evaluate_group, flat_scores, progress
from .fused import FusedModel, check_group, member_loss, uses_augmentation
from .labels import LabelSpace
from .model import CharIds, SoftFiNEModel, build_model, load_checkpoint, save_checkpoint
from .optim import TRAINING_STATE, build_optimizer, load_training_state, make_scheduler, restore, save_training_state

log = logging.getLogger(__name__)

LOSS_PARTS = ("loss", "loss_soft", "loss_aug", "loss_fea")


def train(config: TrainConfig, on_evaluate: Callable[[dict, str], None] | None = None,
          resume_from: str | os.PathLike | None = None, corpus: Corpus | None = None) -> dict:
    """Train, evaluating on dev as configured; returns the best checkpoint's dev and test scores.

    `on_evaluate(metrics, out_dir)` is called after every evaluation, once `out_dir` holds the
    state to resume from and the best checkpoint so far. `resume_from` is such a directory (or
    a copy of it): training continues from its last evaluation. `corpus`: the data, read already
    (`load_corpus(config)`, which is what is read without it).
    """
    report = None if on_evaluate is None else (lambda member, metrics, out_dir: on_evaluate(metrics, out_dir))
    return train_group([config], report, None if resume_from is None else [resume_from], corpus)[0]


def train_group(configs: Sequence[TrainConfig], on_evaluate: Callable[[int, dict, str], None] | None = None,
                resume_from: Sequence[str | os.PathLike] | None = None, corpus: Corpus | None = None) -> list[dict]:
    """Train the runs `configs`, which differ only in loss hyperparameters and `out`, as one fused
    model; each member k is the run `train(configs[k])` would be, with the same files in its own
    out. Returns each member's result, as `train` does.

    `on_evaluate(k, metrics, out_dir)` is called for each member after every evaluation, once all
    members' directories hold their state and best checkpoint. `resume_from` is one such directory
    per member (or copies of them), all of the same evaluation. `corpus`: as `train`'s.
    """
    from transformers import set_seed

    check_group(configs)
    config = configs[0]  # everything but the loss is the members' common setting
    device = resolve_device(config.device)
    outs = [output_directory(c.out) for c in configs]
    set_seed(config.seed)

    corpus = corpus or load_corpus(config)
    sentences = corpus.splits
    if not sentences["train"]:
        raise DataError(f"{corpus.files['train']['path']}: no usable training sentences")
    labels = LabelSpace.infer([c for s in sentences.values() for c in categories(s)], config.label_separator)
    soft_tables = torch.stack([labels.soft_targets(c.beta, c.gamma, c.soft_scope) if c.soft
                               else labels.one_hot_targets() for c in configs]).to(device)

    states = None
    if resume_from is not None:
        tokenizer, members, states = resume_members(resume_from, outs, device)
    else:
        tokenizer, model = build_model(config.model, labels, config.dropout,
                                       (c for s in sentences["train"] for c in s.chars), config.tiny_shape())
        members = [model.to(device)] * len(configs)  # one initialisation, as each run alone would have
    fused = FusedModel(members)
    del members

    char_ids = CharIds(tokenizer)
    data = {name: Split(s, encode(s, char_ids, labels, config.max_length)) for name, s in sentences.items()}
    steps_per_epoch = math.ceil(len(data["train"].examples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = build_optimizer(fused.params, config)
    scheduler = make_scheduler(config, optimizer, total_steps)
    step, best_f1, best_step = 0, [-1.0] * len(configs), [0] * len(configs)
    if states is not None:
        restore(states[0], optimizer, scheduler, fused.stack_optimizer_states([s["optimizer"] for s in states]))
        step = states[0]["step"]
        best_f1, best_step = [s["best_f1"] for s in states], [s["best_step"] for s in states]
        log.info("resumed from %s at step %d (best dev F1 so far %s)", ", ".join(map(str, resume_from)), step,
                 " ".join(f"{f:.4f}" for f in best_f1))

    run_configs = [dataclasses.asdict(c) for c in configs]
    log.info("%s: %d train / %d dev / %d test sentences, %d labels, %d steps on %s%s",
             corpus.name, *(len(sentences.get(s, [])) for s in ("train", "dev", "test")),
             len(labels), total_steps, device, f", {len(configs)} runs fused" if len(configs) > 1 else "")
    multiple = pad_multiple(config.pad_multiple, device, config.compile)

    def evaluate_and_keep(epoch: int, running: dict) -> None:
        fused.train(False)
        scores = evaluate_group(lambda ids, mask: fused(ids, mask)[1], fused.size, data["dev"], labels, device,
                                multiple=multiple, attention=kernel)
        optimizer_state, reports = optimizer.state_dict(), []
        for k, out in enumerate(outs):
            model = fused.member(k)
            if scores[k]["f1"] > best_f1[k]:
                best_f1[k], best_step[k] = scores[k]["f1"], step
                save_checkpoint(out / "best", model, tokenizer, labels, run_configs[k])
            save_checkpoint(out / "state", model, tokenizer, labels, run_configs[k])
            save_training_state(out / "state" / TRAINING_STATE, fused.member_optimizer_state(optimizer_state, k),
                                scheduler.state_dict(), step, best_f1[k], best_step[k])
            n = max(running["n"], 1)
            metrics = {"epoch": epoch, "step": step,
                       **{f"train_{key}": float(running[key][k]) / n for key in LOSS_PARTS},
                       **flat_scores("dev", scores[k]), "best_dev_f1": best_f1[k]}
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            log.info("%sepoch %d step %d: dev P %.4f R %.4f F1 %.4f on %d sentences, %d gold entities (best %.4f "
                     "at step %d)", f"{out}: " if len(outs) > 1 else "", epoch, step, scores[k]["precision"],
                     scores[k]["recall"], scores[k]["f1"], scores[k]["sentences"], scores[k]["gold_entities"],
                     best_f1[k], best_step[k])
            reports.append(metrics)
        fused.train()
        if on_evaluate is not None:  # every member's files are written: a resume finds them at one step
            for k, (metrics, out) in enumerate(zip(reports, outs)):
                on_evaluate(k, metrics, str(out))
        running.update(dict.fromkeys(running, 0.0))

    alphas = [torch.tensor([getattr(c, name) for c in configs], device=device) for name in ("alpha_aug", "alpha_fea")]
    loss = fused.loss(soft_tables, uses_augmentation(config), *alphas)
    if config.compile:
        loss = compile_step(loss, device)
    # A group's attention is the math kernel, in training and evaluation: vmap's rules for SDPA's
    # fused kernels refuse dropout with randomness="same" (fused.py), the CPU's flash kernel has none
    kernel = "math" if fused.size > 1 else config.attention
    running = dict.fromkeys(LOSS_PARTS + ("n",), 0.0)
    started, seen_chars = time.perf_counter(), 0
    bar = progress(total_steps, "train", step)
    for epoch in range(step // steps_per_epoch, config.epochs):
        fused.train()
        skip = step - epoch * steps_per_epoch  # batches of this epoch done before a resume
        batches = train_loader(data["train"].examples, config.batch_size, config.seed, epoch, device.type == "cuda",
                               multiple, config.max_length)
        for batch_number, batch in enumerate(batches):
            if batch_number < skip:
                continue
            with attention_kernels(device, kernel):
                parts = train_step(loss, batch, device)
            fused.clip_grad_norms(config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for key in LOSS_PARTS:
                running[key] = running[key] + parts[key]  # (K,) tensors on the device: no host sync per step
            running["n"] += 1
            seen_chars += int(batch["label_ids"].ne(-100).sum())
            bar.update()
            if config.log_every and step % config.log_every == 0:
                losses = " ".join(f"{float(x) / max(running['n'], 1):.4f}" for x in running["loss"])
                bar.set_postfix(epoch=epoch + 1, loss=losses)
                elapsed = time.perf_counter() - started
                log.info("epoch %d step %d/%d loss %s (%.0f chars/s, lr %.2e)", epoch + 1, step, total_steps,
                         losses, seen_chars / elapsed, scheduler.get_last_lr()[0])
            if config.eval_every and step % config.eval_every == 0 and step % steps_per_epoch:
                evaluate_and_keep(epoch + 1, running)
        evaluate_and_keep(epoch + 1, running)
    bar.close()
    train_seconds = time.perf_counter() - started

    results = [{"best_dev_f1": best_f1[k], "best_step": best_step[k], "best_checkpoint": str(out / "best"),
                "dev_sentences": len(data["dev"].sentences),
                "dev_gold_entities": sum(tag[0] in "BS" for s in data["dev"].sentences for tag in s.tags),
                "data_sha256": corpus.sha256, "train_seconds": train_seconds,
                **{f"{split}_unseen_entities": sum(counts.values()) for split, counts in corpus.unseen.items()}}
               for k, out in enumerate(outs)]
    if "test" in data:
        del fused, optimizer
        best = FusedModel([load_checkpoint(out / "best", device)[0] for out in outs]).train(False)
        test_scores = evaluate_group(lambda ids, mask: best(ids, mask)[1], best.size, data["test"], labels, device,
                                     multiple=multiple, attention=kernel)
        for k, out in enumerate(outs):
            results[k].update(flat_scores("test", test_scores[k]))
            (out / "test_metrics.json").write_text(json.dumps(test_scores[k], indent=1, ensure_ascii=False))
            log.info("%stest (best checkpoint, step %d): P %.4f R %.4f F1 %.4f on %d sentences, %d gold entities",
                     f"{out}: " if len(outs) > 1 else "", best_step[k], test_scores[k]["precision"],
                     test_scores[k]["recall"], test_scores[k]["f1"], test_scores[k]["sentences"],
                     test_scores[k]["gold_entities"])
    else:
        log.warning("%s has no test split: skipped the test evaluation", corpus.name)
    report_unseen(corpus)  # with the scores it explains
    return results


def output_directory(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: a file is there; give a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def resume_members(resume_from: Sequence[str | os.PathLike], outs: Sequence[Path], device: torch.device):
    """(tokenizer, models, training states) of each member's last evaluation, saved in its
    directory's state/; a member's best/ is copied to its out when it resumes from elsewhere.
    Members must have stopped at the same step (a group writes all its members before reporting)."""
    if len(resume_from) != len(outs):
        raise ConfigError(f"resume: {len(resume_from)} directories for a group of {len(outs)}; give one per member")
    models, states = [], []
    for source, out in zip(map(Path, resume_from), outs):
        model, tokenizer, _, _ = load_checkpoint(source / "state", device)
        models.append(model)
        states.append(load_training_state(source / "state" / TRAINING_STATE))
        if source.resolve() != out.resolve() and (source / "best").is_dir():
            shutil.copytree(source / "best", out / "best", dirs_exist_ok=True)
    steps = [s["step"] for s in states]
    if len(set(steps)) > 1:
        raise ConfigError(f"resume: the members' states are at steps {steps}; resume a group from one evaluation")
    return tokenizer, models, states


def forward_loss(model: SoftFiNEModel, soft_table: torch.Tensor, config: TrainConfig) -> Callable[..., dict]:
    """`loss(input_ids, aug_ids, attention_mask, label_ids)`: the forward pass and the SoftFiNE
    loss of one batch for one model (fused.member_loss), in one function that `torch.compile` can
    take whole. A run alone as the members of a fused group compute it."""
    use_aug = uses_augmentation(config)

    def loss(input_ids, aug_ids, attention_mask, label_ids) -> dict[str, torch.Tensor]:
        return member_loss(model, soft_table, use_aug, config.alpha_aug, config.alpha_fea,
                           input_ids, aug_ids, attention_mask, label_ids)

    return loss


def train_step(loss: Callable[..., dict], batch: dict, device: torch.device) -> dict:
    """One forward and backward pass of `loss` (from `forward_loss` or `FusedModel.loss`, compiled
    or not). Returns the loss and its parts as detached tensors on `device` (a fused group's of
    shape (K,); reading them syncs CUDA)."""
    # non_blocking: the copies from pinned memory overlap the GPU's work (no host sync per step)
    tensors = [batch[k].to(device, non_blocking=True) for k in ("input_ids", "aug_ids", "attention_mask", "label_ids")]
    with autocast(device):
        parts = loss(*tensors)
    parts["loss"].sum().backward()  # a group's members' losses: each member's gradients are its own
    return {k: v.detach() for k, v in parts.items()}
