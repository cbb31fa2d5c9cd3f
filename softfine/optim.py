"""The optimizer side of training: AdamW, its learning-rate schedule, and the state that resumes
them (optimizer, scheduler, step, best score, random generators), saved without pickled code."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated

import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

from .config import TrainConfig
from .errors import ConfigError, StorageError

TRAINING_STATE = "training_state.pt"  # optimizer, scheduler, step, RNG: tensors and plain values only


def build_optimizer(
    model: torch.nn.Module | Mapping[str, torch.Tensor], config: TrainConfig
) -> torch.optim.Optimizer:
    """AdamW over a model's parameters, or over named tensors (a fused group's stacked ones, in the
    model's order, so that a member's state lines up with a run's)."""
    named = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else dict(model)
    decay, no_decay = ([named[name] for name in group] for group in decay_groups(named))
    fused = all(p.is_cuda for p in decay + no_decay)  # one kernel for the whole update on a GPU
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        fused=fused or None,
    )


def decay_groups(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The parameter names AdamW decays and those it does not, in `names`' order: the optimizer's
    state numbers the first group's parameters, then the second's."""
    # No weight decay on biases and LayerNorm weights, as in BERT.
    decay, no_decay = [], []
    for name in names:
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(
            name
        )
    return decay, no_decay


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    if config.schedule == "onecycle":
        # OneCycleLR divides by each phase's length: its warm-up must end past the first step and
        # before the last, which a short run (10 steps or fewer at ratio 0.1) would not otherwise do.
        warmup = min(max(config.warmup_ratio, 1.5 / total_steps), 1 - 0.5 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=warmup,
            anneal_strategy="cos",
            cycle_momentum=False,
        )
    from transformers import get_scheduler

    return get_scheduler(
        config.schedule,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )


def save_training_state(
    path: Path, optimizer_state: dict, scheduler_state: dict, step: int, best_f1: float, best_step: int
) -> None:
    """A run's optimizer and scheduler state_dicts (a fused member's own part, see fused.py), its
    step, best dev F1 and the random generators."""
    try:
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler_state,
                "step": step,
                "best_f1": best_f1,
                "best_step": best_step,
                "rng": _rng_state(),
            },
            path,
        )
    except (OSError, RuntimeError) as err:  # torch's zip writer raises RuntimeError on a full disk
        raise StorageError(f"{path}: cannot write it ({str(err)[:200]})") from None


def load_training_state(path: Path) -> dict:
    """The training state saved beside the weights, loaded without running any pickled code and
    checked as `save_training_state` writes it (TrainingState): a file that holds anything but
    tensors and plain values, or other keys or types, is refused, naming the key. Keys besides
    TrainingState's (another version's) are left as they are."""
    import pickle

    if not path.is_file():
        raise ConfigError(f"{path}: missing; cannot resume from {path.parent.parent}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"{path}: refused to load it: not a training state of plain tensors and values "
            f"({first[:200]}); was it written by someone else?"
        ) from None
    try:
        check_training_state(state)
    except ValueError as err:  # pydantic's ValidationError is one
        raise ConfigError(
            f"{path}: not a training state to resume from: {_why(err)}; was it written by someone else?"
        ) from None
    return state


def restore(
    state: dict, optimizer: torch.optim.Optimizer, scheduler, optimizer_state: dict | None = None
) -> None:
    """Loads a saved state into `optimizer` (or `optimizer_state` instead of the saved one: a
    fused group's, stacked from its members') and `scheduler`, and the random generators."""
    try:
        optimizer.load_state_dict(optimizer_state if optimizer_state is not None else state["optimizer"])
    except ValueError as err:  # torch's: other parameter groups or counts than the model's
        raise ConfigError(
            f"resume: the saved optimizer state does not fit the model ({str(err)[:200]}); "
            "was it saved with another model?"
        ) from None
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])


# What save_training_state writes, as load_training_state checks it (pydantic, strict as TrainConfig).
STRICT = ConfigDict(strict=True, arbitrary_types_allowed=True, allow_inf_nan=False)
Natural = Annotated[int, Field(ge=0)]  # a step or a parameter's number


@with_config(STRICT)
class Moments(TypedDict):
    """AdamW's state of one parameter."""

    step: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


@with_config(STRICT)
class ParamGroup(TypedDict):
    """An AdamW parameter group: its parameters' numbers and the settings a resume takes from it
    (which of them a torch version writes varies)."""

    params: list[Natural]
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    amsgrad: NotRequired[bool]
    maximize: NotRequired[bool]
    foreach: NotRequired[bool | None]
    capturable: NotRequired[bool]
    differentiable: NotRequired[bool]
    fused: NotRequired[bool | None]
    initial_lr: NotRequired[float]
    max_lr: NotRequired[float]
    min_lr: NotRequired[float]


@with_config(STRICT)
class OptimizerState(TypedDict):
    state: dict[Natural, Moments]
    param_groups: list[ParamGroup]


@with_config(STRICT)
class SchedulerState(TypedDict):
    """The keys every torch scheduler writes (the others are the scheduler's own)."""

    base_lrs: list[float]
    last_epoch: Natural


@with_config(STRICT)
class RngState(TypedDict):
    python: tuple[int, tuple[int, ...], float | None]
    torch: torch.Tensor
    cuda: list[torch.Tensor]


@with_config(STRICT)
class TrainingState(TypedDict):
    optimizer: OptimizerState
    scheduler: SchedulerState
    step: Natural
    best_f1: float
    best_step: Natural
    rng: RngState


def check_training_state(state: object) -> None:
    """Raises ValueError (pydantic's ValidationError, or one naming the key) unless `state` is a
    training state as save_training_state writes it, with values a resume can load."""
    TypeAdapter(TrainingState).validate_python(state)
    if state["best_step"] > state["step"]:
        raise ValueError(f"key 'best_step': {state['best_step']} is past key 'step' {state['step']}")
    numbered = {i for group in state["optimizer"]["param_groups"] for i in group["params"]}
    for i, moments in state["optimizer"]["state"].items():
        if i not in numbered:
            raise ValueError(f"key 'optimizer.state.{i}': no parameter group has parameter {i}")
        if moments["exp_avg"].shape != moments["exp_avg_sq"].shape:
            raise ValueError(
                f"key 'optimizer.state.{i}': exp_avg of shape {list(moments['exp_avg'].shape)} but "
                f"exp_avg_sq of shape {list(moments['exp_avg_sq'].shape)}"
            )
    rng = state["rng"]
    if len(rng["python"][1]) != len(random.getstate()[1]):
        raise ValueError(f"key 'rng.python': {len(rng['python'][1])} words, not Python's generator's state")
    generators = {"torch": rng["torch"], **{f"cuda.{i}": t for i, t in enumerate(rng["cuda"])}}
    for key, value in generators.items():
        wrong_size = key == "torch" and value.shape != torch.get_rng_state().shape  # a CUDA one's is its own
        if value.dtype != torch.uint8 or value.dim() != 1 or wrong_size:
            raise ValueError(
                f"key 'rng.{key}': a {value.dtype} tensor of shape {list(value.shape)}, not a "
                "random generator's state"
            )


def _why(err: ValueError) -> str:
    """A ValidationError's first problem as `key 'a.b': message (got value: type)`, or err itself."""
    if not isinstance(err, ValidationError):
        return str(err)
    first = err.errors()[0]
    got, loc = first.get("input"), [str(part) for part in first["loc"]]
    if isinstance(got, (str, int, float)):
        shown = f" (got {got!r:.50}: {type(got).__name__})"
    else:
        shown = f" (got {type(got).__name__})" if first["type"] != "missing" else ""
    if not loc:
        return f"expected a dict of {', '.join(TrainingState.__annotations__)}{shown}"
    if loc[-1] == "[key]":  # a dict's key of the wrong type, e.g. a parameter's number as a string
        return f"key {'.'.join(loc[:-2])!r} has the key {loc[-2]!r}: {first['msg']}{shown}"
    return f"key {'.'.join(loc)!r}: {first['msg']}{shown}"


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
