"""The optimizer side of training: AdamW, its learning-rate schedule, and the state that resumes
them (optimizer, scheduler, step, best score, random generators), saved without pickled code."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .config import TrainConfig
from .errors import ConfigError, StorageError

TRAINING_STATE = "training_state.pt"  # optimizer, scheduler, step, RNG: tensors and plain values only


def build_optimizer(model: torch.nn.Module | Mapping[str, torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over a model's parameters, or over named tensors (a fused group's stacked ones, in the
    model's order, so that a member's state lines up with a run's)."""
    named = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else dict(model)
    decay, no_decay = ([named[name] for name in group] for group in decay_groups(named))
    fused = all(p.is_cuda for p in decay + no_decay)  # one kernel for the whole update on a GPU
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, fused=fused or None)


def decay_groups(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The parameter names AdamW decays and those it does not, in `names`' order: the optimizer's
    state numbers the first group's parameters, then the second's."""
    # No weight decay on biases and LayerNorm weights, as in BERT.
    decay, no_decay = [], []
    for name in names:
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(name)
    return decay, no_decay


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


def save_training_state(path: Path, optimizer_state: dict, scheduler_state: dict, step: int, best_f1: float,
                        best_step: int) -> None:
    """A run's optimizer and scheduler state_dicts (a fused member's own part, see fused.py), its
    step, best dev F1 and the random generators."""
    try:
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "step": step,
                    "best_f1": best_f1, "best_step": best_step, "rng": _rng_state()}, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer raises RuntimeError on a full disk
        raise StorageError(f"{path}: cannot write it ({str(err)[:200]})") from None


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


def restore(state: dict, optimizer: torch.optim.Optimizer, scheduler, optimizer_state: dict | None = None) -> None:
    """Loads a saved state into `optimizer` (or `optimizer_state` instead of the saved one: a
    fused group's, stacked from its members') and `scheduler`, and the random generators."""
    optimizer.load_state_dict(optimizer_state if optimizer_state is not None else state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
