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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .batches import Split, encode, train_loader
from .config import METRIC, METRICS_FILE, TEST_METRICS_FILE, TrainConfig
from .datasets import Corpus, load_corpus, report_unseen
from .device import attention_kernels, autocast, compile_step, pad_multiple, resolve_device
from .errors import ConfigError, DataError
from .evaluate import evaluate_group, flat_scores, progress
from .fused import FusedModel, check_group, uses_augmentation
from .labels import LabelSpace
from .model import CharIds, build_model, load_checkpoint, save_checkpoint
from .optim import (
    TRAINING_STATE,
    build_optimizer,
    load_training_state,
    make_scheduler,
    restore,
    save_training_state,
)
from .stats import categories

log = logging.getLogger(__name__)

LOSS_PARTS = ("loss", "loss_soft", "loss_aug", "loss_fea")


def train(
    config: TrainConfig,
    on_evaluate: Callable[[dict, str], None] | None = None,
    resume_from: str | os.PathLike | None = None,
    corpus: Corpus | None = None,
) -> dict:
    """Train, evaluating on dev as configured; returns the best checkpoint's dev and test scores.

    `on_evaluate(metrics, out_dir)` is called after every evaluation, once `out_dir` holds the
    state to resume from and the best checkpoint so far. `resume_from` is such a directory (or
    a copy of it): training continues from its last evaluation. `corpus`: the data, read already
    (`load_corpus(config)`, which is what is read without it).
    """
    report = None if on_evaluate is None else (lambda member, metrics, out_dir: on_evaluate(metrics, out_dir))
    return train_group([config], report, None if resume_from is None else [resume_from], corpus)[0]


def train_group(
    configs: Sequence[TrainConfig],
    on_evaluate: Callable[[int, dict, str], None] | None = None,
    resume_from: Sequence[str | os.PathLike] | None = None,
    corpus: Corpus | None = None,
) -> list[dict]:
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
    labels = label_space(corpus, config)
    states = None
    if resume_from is not None:
        tokenizer, members, states = resume_members(resume_from, outs, device)
    else:
        tokenizer, model = new_encoder(config, labels, corpus)
        members = [model.to(device)] * len(configs)  # one initialisation, as each run alone would have
    run = GroupRun(configs, outs, corpus, labels, tokenizer, FusedModel(members), device)
    del members
    if states is not None:
        run.restore(states)
        log.info(
            "resumed from %s at step %d (best dev F1 so far %s)",
            ", ".join(map(str, resume_from)),
            run.step,
            " ".join(f"{f:.4f}" for f in run.best_f1),
        )
    run.train(on_evaluate)
    results = run.results()
    if "test" in run.data:
        run.test(results)
    else:
        log.warning("%s has no test split: skipped the test evaluation", corpus.name)
    report_unseen(corpus)  # with the scores it explains
    return results


# ---------------------------------------------------------------------------------------------
# The set-up every run of a config starts from (shared with memory.py): the label space of its
# data and a new encoder for it.


def label_space(corpus: Corpus, config: TrainConfig) -> LabelSpace:
    """The labels of every category in the corpus's splits (a run's data must have training sentences)."""
    if not corpus.splits.get("train"):
        raise DataError(f"{corpus.files['train']['path']}: no usable training sentences")
    return LabelSpace.infer(
        [c for s in corpus.splits.values() for c in categories(s)], config.label_separator
    )


def new_encoder(config: TrainConfig, labels: LabelSpace, corpus: Corpus) -> tuple:
    """(tokenizer, model): `config.model` with a new classifier for `labels` (the tiny encoder's
    vocabulary from the training characters)."""
    return build_model(
        config.model,
        labels,
        config.dropout,
        (c for s in corpus.splits["train"] for c in s.chars),
        config.tiny_shape(),
    )


def encoded(corpus: Corpus, tokenizer, labels: LabelSpace, config: TrainConfig) -> dict[str, Split]:
    char_ids = CharIds(tokenizer)
    return {
        name: Split(s, encode(s, char_ids, labels, config.max_length)) for name, s in corpus.splits.items()
    }


# ---------------------------------------------------------------------------------------------
# The loop: a group's steps, its evaluations (each member's files), its test.


class GroupRun:
    """One fused group in training: its data, optimizer and schedule, step, and best dev F1s."""

    def __init__(
        self,
        configs: Sequence[TrainConfig],
        outs: list[Path],
        corpus: Corpus,
        labels: LabelSpace,
        tokenizer,
        fused: FusedModel,
        device: torch.device,
    ):
        config = self.config = configs[0]
        self.outs, self.corpus, self.labels, self.tokenizer, self.fused, self.device = (
            outs,
            corpus,
            labels,
            tokenizer,
            fused,
            device,
        )
        self.run_configs = [dataclasses.asdict(c) for c in configs]
        self.data = encoded(corpus, tokenizer, labels, config)
        self.steps_per_epoch = math.ceil(len(self.data["train"].examples) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.optimizer = build_optimizer(fused.params, config)
        self.scheduler = make_scheduler(config, self.optimizer, self.total_steps)
        self.step, self.best_f1, self.best_step = 0, [-1.0] * len(configs), [0] * len(configs)
        self.multiple = pad_multiple(config.pad_multiple, device, config.compile)
        # A group's attention is the math kernel, in training and evaluation: vmap's rules for SDPA's
        # fused kernels refuse dropout with randomness="same" (fused.py), the CPU's flash kernel has none
        self.kernel = "math" if fused.size > 1 else config.attention
        soft_tables = torch.stack(
            [
                labels.soft_targets(c.beta, c.gamma, c.soft_scope) if c.soft else labels.one_hot_targets()
                for c in configs
            ]
        ).to(device)
        alphas = [
            torch.tensor([getattr(c, name) for c in configs], device=device)
            for name in ("alpha_aug", "alpha_fea")
        ]
        self.loss = fused.loss(soft_tables, uses_augmentation(config), *alphas)
        if config.compile:
            static = [*fused.params.values(), *fused.buffers.values(), soft_tables, *alphas]
            self.loss = compile_step(self.loss, device, static)
        self.running = dict.fromkeys(LOSS_PARTS + ("n",), 0.0)
        self.seen_chars = 0

    def restore(self, states: list[dict]) -> None:
        """The members' training states of one evaluation (resume_members)."""
        restore(
            states[0],
            self.optimizer,
            self.scheduler,
            self.fused.stack_optimizer_states([s["optimizer"] for s in states]),
        )
        self.step = states[0]["step"]
        self.best_f1, self.best_step = [s["best_f1"] for s in states], [s["best_step"] for s in states]

    def train(self, on_evaluate: Callable[[int, dict, str], None] | None) -> None:
        config, sentences = self.config, self.corpus.splits
        log.info(
            "%s: %d train / %d dev / %d test sentences, %d labels, %d steps on %s%s",
            self.corpus.name,
            *(len(sentences.get(s, [])) for s in ("train", "dev", "test")),
            len(self.labels),
            self.total_steps,
            self.device,
            f", {self.fused.size} runs fused" if self.fused.size > 1 else "",
        )
        started = time.perf_counter()
        bar = progress(self.total_steps, "train", self.step)
        for epoch in range(self.step // self.steps_per_epoch, config.epochs):
            self.fused.train()
            skip = self.step - epoch * self.steps_per_epoch  # batches of this epoch done before a resume
            batches = train_loader(
                self.data["train"].examples,
                config.batch_size,
                config.seed,
                epoch,
                self.device.type == "cuda",
                self.multiple,
                config.max_length,
            )
            for batch_number, batch in enumerate(batches):
                if batch_number < skip:
                    continue
                self.train_on(batch)
                bar.update()
                if config.log_every and self.step % config.log_every == 0:
                    self.log_progress(bar, epoch, started)
                if (
                    config.eval_every
                    and self.step % config.eval_every == 0
                    and self.step % self.steps_per_epoch
                ):
                    self.evaluate_and_keep(epoch + 1, on_evaluate)
            self.evaluate_and_keep(epoch + 1, on_evaluate)
        bar.close()
        self.train_seconds = time.perf_counter() - started

    def train_on(self, batch: dict) -> None:
        """One optimizer step of every member on `batch`; the loss parts summed on the device."""
        with attention_kernels(self.device, self.kernel):
            parts = train_step(self.loss, batch, self.device)
        self.fused.clip_grad_norms(self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        for key in LOSS_PARTS:  # (K,) tensors on the device: no host sync per step
            self.running[key] = self.running[key] + parts[key]
        self.running["n"] += 1
        self.seen_chars += int(batch["label_ids"].ne(-100).sum())

    def log_progress(self, bar, epoch: int, started: float) -> None:
        losses = " ".join(f"{float(x) / max(self.running['n'], 1):.4f}" for x in self.running["loss"])
        bar.set_postfix(epoch=epoch + 1, loss=losses)
        log.info(
            "epoch %d step %d/%d loss %s (%.0f chars/s, lr %.2e)",
            epoch + 1,
            self.step,
            self.total_steps,
            losses,
            self.seen_chars / (time.perf_counter() - started),
            self.scheduler.get_last_lr()[0],
        )

    def evaluate_and_keep(self, epoch: int, on_evaluate: Callable[[int, dict, str], None] | None) -> None:
        """Scores every member on dev, writes its files (best checkpoint, state, metrics line),
        then reports: a resume finds every member's files at one step."""
        self.fused.train(False)
        scores = evaluate_group(
            lambda ids, mask: self.fused(ids, mask)[1],
            self.fused.size,
            self.data["dev"],
            self.labels,
            self.device,
            multiple=self.multiple,
            attention=self.kernel,
        )
        optimizer_state = self.optimizer.state_dict()
        reports = [self.keep(k, out, scores[k], epoch, optimizer_state) for k, out in enumerate(self.outs)]
        self.fused.train()
        if on_evaluate is not None:
            for k, (metrics, out) in enumerate(zip(reports, self.outs)):
                on_evaluate(k, metrics, str(out))
        self.running.update(dict.fromkeys(self.running, 0.0))

    def keep(self, k: int, out: Path, scores: dict, epoch: int, optimizer_state: dict) -> dict:
        """Member k's files of this evaluation; its metrics line."""
        model = self.fused.member(k)
        if scores["f1"] > self.best_f1[k]:
            self.best_f1[k], self.best_step[k] = scores["f1"], self.step
            save_checkpoint(out / "best", model, self.tokenizer, self.labels, self.run_configs[k])
        save_checkpoint(out / "state", model, self.tokenizer, self.labels, self.run_configs[k])
        save_training_state(
            out / "state" / TRAINING_STATE,
            self.fused.member_optimizer_state(optimizer_state, k),
            self.scheduler.state_dict(),
            self.step,
            self.best_f1[k],
            self.best_step[k],
        )
        n = max(self.running["n"], 1)
        metrics = {
            "epoch": epoch,
            "step": self.step,
            **{f"train_{key}": float(self.running[key][k]) / n for key in LOSS_PARTS},
            **flat_scores("dev", scores),
            METRIC: self.best_f1[k],
        }
        with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        log.info(
            "%sepoch %d step %d: dev P %.4f R %.4f F1 %.4f on %d sentences, %d gold entities (best %.4f "
            "at step %d)",
            f"{out}: " if len(self.outs) > 1 else "",
            epoch,
            self.step,
            scores["precision"],
            scores["recall"],
            scores["f1"],
            scores["sentences"],
            scores["gold_entities"],
            self.best_f1[k],
            self.best_step[k],
        )
        return metrics

    def results(self) -> list[dict]:
        dev = self.data["dev"].sentences
        return [
            {
                METRIC: self.best_f1[k],
                "best_step": self.best_step[k],
                "best_checkpoint": str(out / "best"),
                "dev_sentences": len(dev),
                "dev_gold_entities": sum(tag[0] in "BS" for s in dev for tag in s.tags),
                "data_sha256": self.corpus.sha256,
                "train_seconds": self.train_seconds,
                **{
                    f"{split}_unseen_entities": sum(counts.values())
                    for split, counts in self.corpus.unseen.items()
                },
            }
            for k, out in enumerate(self.outs)
        ]

    def test(self, results: list[dict]) -> None:
        """Each member's best checkpoint on the test split, into `results` and its test_metrics.json."""
        del self.fused, self.optimizer, self.loss  # the training state's memory, before the best models load
        best = FusedModel([load_checkpoint(out / "best", self.device)[0] for out in self.outs]).train(False)
        scores = evaluate_group(
            lambda ids, mask: best(ids, mask)[1],
            best.size,
            self.data["test"],
            self.labels,
            self.device,
            multiple=self.multiple,
            attention=self.kernel,
        )
        for k, out in enumerate(self.outs):
            results[k].update(flat_scores("test", scores[k]))
            (out / TEST_METRICS_FILE).write_text(json.dumps(scores[k], indent=1, ensure_ascii=False))
            log.info(
                "%stest (best checkpoint, step %d): P %.4f R %.4f F1 %.4f on %d sentences, %d gold entities",
                f"{out}: " if len(self.outs) > 1 else "",
                self.best_step[k],
                scores[k]["precision"],
                scores[k]["recall"],
                scores[k]["f1"],
                scores[k]["sentences"],
                scores[k]["gold_entities"],
            )


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
        raise ConfigError(
            f"resume: {len(resume_from)} directories for a group of {len(outs)}; give one per member"
        )
    models, states = [], []
    for source, out in zip(map(Path, resume_from), outs):
        model, tokenizer, _, _ = load_checkpoint(source / "state", device)
        models.append(model)
        states.append(load_training_state(source / "state" / TRAINING_STATE))
        if source.resolve() != out.resolve() and (source / "best").is_dir():
            shutil.copytree(source / "best", out / "best", dirs_exist_ok=True)
    steps = [s["step"] for s in states]
    if len(set(steps)) > 1:
        raise ConfigError(
            f"resume: the members' states are at steps {steps}; resume a group from one evaluation"
        )
    return tokenizer, models, states


def train_step(loss: Callable[..., dict], batch: dict, device: torch.device) -> dict:
    """One forward and backward pass of `loss` (`FusedModel.loss`, compiled
    or not). Returns the loss and its parts as detached tensors on `device` (a fused group's of
    shape (K,); reading them syncs CUDA)."""
    # non_blocking: the copies from pinned memory overlap the GPU's work (no host sync per step)
    tensors = [
        batch[k].to(device, non_blocking=True)
        for k in ("input_ids", "aug_ids", "attention_mask", "label_ids")
    ]
    with autocast(device):
        parts = loss(*tensors)
    parts["loss"].sum().backward()  # a group's members' losses: each member's gradients are its own
    return {k: v.detach() for k, v in parts.items()}
