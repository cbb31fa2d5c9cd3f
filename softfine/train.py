"""The training loop: data once, batches grouped by length, AdamW with linear warm-up and decay,
dev evaluation every epoch (or every k steps), the best checkpoint by dev F1, then test.

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
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import TrainConfig
from .data import Sentence, categories
from .datasets import available_splits, dataset_files, read_split, sha256_of
from .errors import ConfigError, DataError, DeviceError, StorageError
from .labels import LabelSpace
from .losses import softfine_loss
from .metrics import evaluate_tags
from .model import CharIds, SoftFiNEModel, build_model, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(f"--device {name}: torch sees no CUDA device (CUDA_VISIBLE_DEVICES="
                          f"{visible!r}, torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Data: read once, encode once (ids, augmented ids, label ids), batch by length.

@dataclass
class Split:
    sentences: list[Sentence]
    examples: list[dict]  # one per window: input_ids, aug_ids, label_ids, sentence, offset


def load_splits(config: TrainConfig, splits: Sequence[str]) -> dict[str, list[Sentence]]:
    read = {s: read_split(config.dataset, s, config.data_dir, config.strict) for s in splits}
    if "train" in read and config.limit_train:
        read["train"] = read["train"][:config.limit_train]
    for split in ("dev", "test"):
        if split in read and config.limit_eval:
            read[split] = read[split][:config.limit_eval]
    return read


def encode(sentences: Sequence[Sentence], char_ids: CharIds, labels: LabelSpace, max_length: int) -> list[dict]:
    """Token ids of each sentence and of its augmentation (entity characters replaced by
    [B] [I] [E] [S]), with label ids; sentences longer than a window are split into windows."""
    tokenizer = char_ids.tokenizer
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    seg_ids = {seg: tokenizer.convert_tokens_to_ids(f"[{seg}]") for seg in "BIES"}
    width = max_length - 2
    examples = []
    for number, sentence in enumerate(sentences):
        ids = char_ids(sentence.chars)
        label_ids = [labels.index(tag) for tag in sentence.tags]
        aug = [seg_ids[tag[0]] if tag != "O" else i for tag, i in zip(sentence.tags, ids)]
        for offset in range(0, max(len(ids), 1), width):
            window = slice(offset, offset + width)
            examples.append({
                "input_ids": torch.tensor([cls] + ids[window] + [sep]),
                "aug_ids": torch.tensor([cls] + aug[window] + [sep]),
                "label_ids": torch.tensor([-100] + label_ids[window] + [-100]),
                "sentence": number,
                "offset": offset,
            })
    return examples


def collate(examples: list[dict]) -> dict:
    """Pads a batch to its longest window (dynamic padding)."""
    pad = lambda key, value: torch.nn.utils.rnn.pad_sequence(  # noqa: E731
        [e[key] for e in examples], batch_first=True, padding_value=value)
    input_ids = pad("input_ids", 0)
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    return {
        "input_ids": input_ids,
        "aug_ids": pad("aug_ids", 0),
        "label_ids": pad("label_ids", -100),
        "attention_mask": (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long(),
        "sentence": [e["sentence"] for e in examples],
        "offset": [e["offset"] for e in examples],
    }


def train_loader(examples: list[dict], batch_size: int, seed: int, epoch: int, pin_memory: bool = False):
    """Batches of similar length (transformers' LengthGroupedSampler), reshuffled each epoch;
    `pin_memory` (for CUDA) lets the copies to the GPU run asynchronously."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    sampler = LengthGroupedSampler(batch_size, lengths=[len(e["input_ids"]) for e in examples],
                                   generator=generator)
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, sampler=sampler,
                                       collate_fn=collate, drop_last=False, pin_memory=pin_memory)


def eval_loader(examples: list[dict], batch_size: int):
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    return torch.utils.data.DataLoader([examples[i] for i in order], batch_size=batch_size,
                                       collate_fn=collate)


# ---------------------------------------------------------------------------------------------
# Evaluation and prediction.

def progress(total: int, desc: str, initial: int = 0):
    """A tqdm bar on an interactive terminal; nothing in Ray trials, CI or a redirected log, which
    get the log lines instead."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def autocast(device: torch.device):
    # bf16 on CUDA: the A100/H100 fast path; CPU runs stay in fp32.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict_tags(model: SoftFiNEModel, split: Split, labels: LabelSpace, device: torch.device,
                 batch_size: int = 32) -> list[list[str]]:
    model.eval()
    names = labels.labels
    predicted = [["O"] * len(s) for s in split.sentences]
    batches = eval_loader(split.examples, batch_size)
    bar = progress(len(batches), "evaluate")
    for batch in batches:
        bar.update()
        with autocast(device):
            _, logits = model(batch["input_ids"].to(device, non_blocking=True),
                              batch["attention_mask"].to(device, non_blocking=True))
        best = logits.argmax(-1).cpu()
        for row, number, offset, label_ids in zip(best, batch["sentence"], batch["offset"], batch["label_ids"]):
            chars = label_ids.ne(-100)  # positions of real characters
            for i, label in enumerate(row[chars].tolist()):
                predicted[number][offset + i] = names[label]
    bar.close()
    return predicted


def evaluate(model: SoftFiNEModel, split: Split, labels: LabelSpace, device: torch.device,
             batch_size: int = 32) -> dict:
    predicted = predict_tags(model, split, labels, device, batch_size)
    return evaluate_tags([list(s.tags) for s in split.sentences], predicted, labels)


def flat_scores(prefix: str, scores: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in scores.items() if k != "per_category"}


# ---------------------------------------------------------------------------------------------
# Training.

def build_optimizer(model: SoftFiNEModel, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and LayerNorm weights, as in BERT.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    fused = all(p.is_cuda for p in decay + no_decay)  # one kernel for the whole update on a GPU
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, fused=fused or None)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    if config.schedule == "onecycle":
        # OneCycleLR divides by each phase's length: its warm-up must end past the first step and
        # before the last, which a short run (10 steps or fewer at ratio 0.1) would not otherwise do.
        warmup = min(max(config.warmup_ratio, 1.5 / total_steps), 1 - 0.5 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total_steps,
            pct_start=warmup, anneal_strategy="cos", cycle_momentum=False)
    from transformers import get_scheduler

    return get_scheduler(config.schedule, optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


TRAINING_STATE = "training_state.pt"  # optimizer, scheduler, step, RNG: tensors and plain values only


def load_training_state(path: Path) -> dict:
    """The training state saved beside the weights, loaded without running any pickled code:
    a file that holds anything but tensors and plain values is refused."""
    import pickle

    if not path.is_file():
        raise ConfigError(f"{path}: missing; cannot resume from {path.parent.parent}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{path}: refused to load it: not a training state of plain tensors and values "
                          f"({first[:200]}); was it written by someone else?") from None


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best_f1, best_step = state["step"], state["best_f1"], state["best_step"]
        _set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (best dev F1 so far %.4f)", resume_from, step, best_f1)

    run_config = dataclasses.asdict(config)
    data_sha256 = sha256_of([files[s] for s in splits])
    log.info("%s: %d train / %d dev / %d test sentences, %d labels, %d steps on %s",
             config.dataset, *(len(sentences.get(s, [])) for s in ("train", "dev", "test")),
             len(labels), total_steps, device)

    def evaluate_and_keep(epoch: int, running: dict) -> None:
        nonlocal best_f1, best_step
        scores = evaluate(model, data["dev"], labels, device)
        if scores["f1"] > best_f1:
            best_f1, best_step = scores["f1"], step
            save_checkpoint(out / "best", model, tokenizer, labels, run_config)
        save_checkpoint(out / "state", model, tokenizer, labels, run_config)
        try:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                        "best_f1": best_f1, "best_step": best_step, "rng": _rng_state()},
                       out / "state" / TRAINING_STATE)
        except (OSError, RuntimeError) as err:  # torch's zip writer raises RuntimeError on a full disk
            raise StorageError(f"{out / 'state' / TRAINING_STATE}: cannot write it ({str(err)[:200]})") from None
        n = max(running["n"], 1)
        metrics = {"epoch": epoch, "step": step,
                   **{f"train_{k}": float(running[k]) / n for k in ("loss", "loss_soft", "loss_aug", "loss_fea")},
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

    running = dict.fromkeys(("loss", "loss_soft", "loss_aug", "loss_fea", "n"), 0.0)
    started, seen_chars = time.perf_counter(), 0
    bar = progress(total_steps, "train", step)
    for epoch in range(step // steps_per_epoch, config.epochs):
        model.train()
        skip = step - epoch * steps_per_epoch  # batches of this epoch done before a resume
        batches = train_loader(data["train"].examples, config.batch_size, config.seed, epoch, device.type == "cuda")
        for batch_number, batch in enumerate(batches):
            if batch_number < skip:
                continue
            parts = train_step(model, batch, soft_table, config, device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for k in ("loss", "loss_soft", "loss_aug", "loss_fea"):
                running[k] += parts[k]  # tensors on the device: no host sync per step
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
        test_scores = evaluate(best_model, data["test"], labels, device)
        result.update(flat_scores("test", test_scores))
        (out / "test_metrics.json").write_text(json.dumps(test_scores, indent=1, ensure_ascii=False))
        log.info("test (best checkpoint, step %d): P %.4f R %.4f F1 %.4f on %d sentences, %d gold entities",
                 best_step, test_scores["precision"], test_scores["recall"], test_scores["f1"],
                 test_scores["sentences"], test_scores["gold_entities"])
    else:
        log.warning("%s has no test split in %s: skipped the test evaluation", config.dataset, files["train"].parent)
    return result


def train_step(model: SoftFiNEModel, batch: dict, soft_table: torch.Tensor, config: TrainConfig,
                device: torch.device) -> dict:
    """One forward and backward pass; original and augmented sentences share one encoder call.
    Returns the loss and its parts as detached tensors on `device` (reading them syncs CUDA)."""
    # non_blocking: the copies from pinned memory overlap the GPU's work (no host sync per step)
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["attention_mask"].to(device, non_blocking=True)
    label_ids = batch["label_ids"].to(device, non_blocking=True)
    chars = label_ids.ne(-100)
    targets = soft_table[label_ids[chars]]  # a row lookup per character
    use_aug = config.aug and (config.alpha_aug > 0 or config.alpha_fea > 0)
    with autocast(device):
        if use_aug:
            features, logits = model(torch.cat([input_ids, batch["aug_ids"].to(device, non_blocking=True)]),
                                     torch.cat([mask, mask]))
            n = input_ids.shape[0]
            entity = chars & label_ids.ne(0)  # label 0 is O
            parts = softfine_loss(logits[:n][chars], targets, aug_logits=logits[n:][chars],
                                  features=features[:n][entity], aug_features=features[n:][entity],
                                  alpha_aug=config.alpha_aug, alpha_fea=config.alpha_fea)
        else:
            _, logits = model(input_ids, mask)
            parts = softfine_loss(logits[chars], targets)
    parts["loss"].backward()
    return {k: v.detach() for k, v in parts.items()}
