"""Fused training: a group of K runs that differ only in their loss, trained as one model.

The searched values of SoftFiNE (alpha_aug, alpha_fea, beta, gamma, the soft-label scope) enter
only the loss. Runs that differ in nothing else have the same encoder shape, the same initial
weights (one seed), the same batches in the same order and the same schedule. So their weights are
stacked: every parameter becomes one tensor of shape (K, ...), and `torch.func.vmap` runs the
model over the stack, K forward and backward passes as batched kernels on one batch of inputs.

Each member stays the run it would be alone:
- its loss has its own soft-target table and alphas (vmapped with the weights), and the K losses
  are summed before one backward pass: a member's loss depends on its own weights only, so the
  gradients do not mix;
- dropout draws the masks a run alone draws: vmap's randomness="same" makes one draw of the
  unbatched shape per dropout call, the draws of a run alone with the same seed. The attention's
  dropout must then run in SDPA's math kernel (matmuls, softmax, dropout), as it does on a CPU:
  vmap's rules for the fused kernels (memory-efficient, flash, cuDNN) refuse dropout with
  randomness="same", so a group of more than one trains with the math kernel on a GPU too;
- a group of one is not vmapped (vmap over one member only adds its per-operator cost);
- AdamW works element by element, so one AdamW over the stacked tensors updates each member as
  its own would; gradient clipping is per member (`clip_grad_norms`);
- `member(k)` unstacks member k into a SoftFiNEModel, to be saved as any run's checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.func import functional_call, stack_module_state, vmap

from .config import SEARCHED, TrainConfig
from .errors import ConfigError
from .losses import softfine_loss
from .model import SoftFiNEModel
from .optim import decay_groups

# What members of a group may differ in: what enters the loss only, and where a run writes.
LOSS_FIELDS = (*SEARCHED, "soft_scope", "soft")


def uses_augmentation(config: TrainConfig) -> bool:
    """Whether a step feeds the augmented sentences through the encoder too."""
    return config.aug and (config.alpha_aug > 0 or config.alpha_fea > 0)


def check_group(configs: Sequence[TrainConfig]) -> None:
    """Refuses (ConfigError, one line) a group whose members differ in more than their loss."""
    if not configs:
        raise ConfigError("a fused group needs at least one configuration")
    first = dataclasses.asdict(configs[0])
    for number, config in enumerate(configs[1:], 1):
        for name, value in dataclasses.asdict(config).items():
            if name not in LOSS_FIELDS + ("out",) and value != first[name]:
                raise ConfigError(
                    f"fused group: member {number} has {name}={value!r} but member 0 has "
                    f"{first[name]!r}; members may differ only in {', '.join(LOSS_FIELDS)} and out"
                )
        if uses_augmentation(config) != uses_augmentation(configs[0]):
            # alpha_aug = alpha_fea = 0 skips the augmented half of the batch: another forward pass
            raise ConfigError(
                f"fused group: member {number} {'uses' if uses_augmentation(config) else 'skips'} "
                "the augmented sentences and member 0 does not (alpha_aug = alpha_fea = 0 skips them); "
                "put such points in a group of their own"
            )
    outs = [Path(c.out).resolve() for c in configs]
    if len(set(outs)) < len(outs):
        twice = next(out for out in outs if outs.count(out) > 1)
        raise ConfigError(f"fused group: two members write to {twice}; give each its own out")


def member_loss(
    model: Callable,
    soft_table: torch.Tensor,
    use_aug: bool,
    alpha_aug,
    alpha_fea,
    input_ids,
    aug_ids,
    attention_mask,
    label_ids,
) -> dict[str, torch.Tensor]:
    """The forward pass of `model` (input_ids, attention_mask -> features, logits) and the SoftFiNE
    loss of one batch, over fixed-shape tensors with masks (nothing waits for the GPU). Original
    and augmented sentences share one encoder call."""
    chars = label_ids.ne(-100)
    targets = soft_table[label_ids.clamp(min=0)]  # a row lookup per position
    if not use_aug:
        _, logits = model(input_ids, attention_mask)
        return softfine_loss(logits, targets, chars)
    n = input_ids.shape[0]
    features, logits = model(torch.cat([input_ids, aug_ids]), torch.cat([attention_mask, attention_mask]))
    return softfine_loss(
        logits[:n],
        targets,
        chars,
        aug_logits=logits[n:],
        features=features[:n],
        aug_features=features[n:],
        entities=chars & label_ids.ne(0),  # label 0 is O
        alpha_aug=alpha_aug,
        alpha_fea=alpha_fea,
    )


class FusedModel:
    """K models of one architecture as stacked tensors: `params` and `buffers` map each name of
    the model's to a tensor of shape (K, ...); the parameters are the leaves AdamW updates."""

    def __init__(self, models: Sequence[SoftFiNEModel]):
        self.size = len(models)
        self.params, self.buffers = stack_module_state(list(models))
        # The architecture without weights: functional_call runs it with member k's tensors.
        self.skeleton = copy.deepcopy(models[0]).to("meta")

    def train(self, mode: bool = True) -> FusedModel:
        # Dropout on or off, for every member. Set on each module, not by transformers' train(),
        # which re-applies its hub kernels on a change of mode and refuses a model on "meta".
        for module in self.skeleton.modules():
            module.training = mode
        return self

    def _call(self, params: dict, buffers: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return functional_call(self.skeleton, (params, buffers), (input_ids, attention_mask))

    def _map(self, fn: Callable, in_dims: tuple) -> Callable:
        """`fn` over the members: vmapped, or for a group of one called on member 0's views (vmap
        over one member would only add its per-operator cost), with outputs stacked to (1, ...)."""
        if self.size > 1:
            return vmap(fn, in_dims=in_dims, randomness="same")

        def one(*args):
            outputs = fn(*(_first(a) if dim == 0 else a for a, dim in zip(args, in_dims)))
            if isinstance(outputs, dict):  # a loss's parts, or (features, logits)
                return {key: value.unsqueeze(0) for key, value in outputs.items()}
            return tuple(value.unsqueeze(0) for value in outputs)

        return one

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of every member, each with a leading dimension K."""
        return self._map(self._call, (0, 0, None, None))(self.params, self.buffers, input_ids, attention_mask)

    def loss(
        self, soft_tables: torch.Tensor, use_aug: bool, alpha_aug: torch.Tensor, alpha_fea: torch.Tensor
    ) -> Callable[..., dict]:
        """`loss(input_ids, aug_ids, attention_mask, label_ids)`: every member's `member_loss`, each
        part a (K,) tensor; soft_tables (K, N, N), the alphas (K,)."""

        def one(params, buffers, table, a_aug, a_fea, *batch):
            model = lambda ids, mask: self._call(params, buffers, ids, mask)  # noqa: E731
            return member_loss(model, table, use_aug, a_aug, a_fea, *batch)

        fused = self._map(one, (0, 0, 0, 0, 0, None, None, None, None))
        return lambda *batch: fused(self.params, self.buffers, soft_tables, alpha_aug, alpha_fea, *batch)

    @torch.no_grad()
    def clip_grad_norms(self, max_norm: float) -> torch.Tensor:
        """Each member's gradients scaled as torch.nn.utils.clip_grad_norm_ scales a run's: by
        max_norm / (norm + 1e-6), at most 1, where norm is the member's own total gradient norm
        (the norm of its per-parameter norms). Returns the K norms; nothing waits for the GPU."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # (parameters, K)
        total = torch.linalg.vector_norm(norms, dim=0)
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
        return total

    @torch.no_grad()
    def member(self, k: int) -> SoftFiNEModel:
        """Member k as a SoftFiNEModel of its own (a copy, on the stack's device)."""
        device = next(iter(self.params.values())).device
        model = copy.deepcopy(self.skeleton).to_empty(device=device)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor.copy_((self.params if name in self.params else self.buffers)[name][k])
        return model

    def optimizer_shapes(self) -> list[torch.Size]:
        """The stacked parameters' shapes as AdamW numbers its state (build_optimizer's groups)."""
        return [self.params[name].shape for group in decay_groups(self.params) for name in group]

    def member_optimizer_state(self, state: dict, k: int) -> dict:
        """Member k's part of the stacked AdamW's state_dict: what its own AdamW would hold, in
        tensors of its own (torch.save writes a view's whole storage: every member's moments)."""
        shapes = self.optimizer_shapes()
        return {
            "param_groups": state["param_groups"],
            "state": {
                i: {
                    key: value[k].clone() if _stacked(key, value, shapes[i]) else value
                    for key, value in per_param.items()
                }
                for i, per_param in state["state"].items()
            },
        }

    def stack_optimizer_states(self, states: Sequence[dict]) -> dict:
        """The stacked AdamW's state_dict from its members' (as `member_optimizer_state` gives them).
        A state saved before members' moments were their own holds the stacked ones: taken as is.
        Moments that fit no parameter of the model are a ConfigError (states of another model)."""
        shapes = self.optimizer_shapes()
        self._check_fits(states, shapes)
        stacked = {}
        for i, per_param in states[0]["state"].items():
            stacked[i] = {
                key: torch.stack([s["state"][i][key] for s in states])
                if _stacked(key, value, shapes[int(i)], member=True)
                else value
                for key, value in per_param.items()
            }
        return {"param_groups": states[0]["param_groups"], "state": stacked}

    def _check_fits(self, states: Sequence[dict], shapes: list[torch.Size]) -> None:
        """Every member's moments are of its parameter's shape (or of the stack's, saved before
        members' were their own), numbered as AdamW numbers them, as member 0's are."""
        names = [name for group in decay_groups(self.params) for name in group]
        for k, state in enumerate(states):
            whose = f"member {k}'s optimizer state" if self.size > 1 else "the saved optimizer state"
            unknown = sorted(set(state["state"]) - set(range(len(shapes))))
            if unknown:
                raise ConfigError(
                    f"resume: {whose} has moments of parameter {unknown[0]}, but the model has "
                    f"{len(shapes)} (0 to {len(shapes) - 1}); was it saved with another model?"
                )
            if state["state"].keys() != states[0]["state"].keys():
                raise ConfigError(
                    f"resume: {whose} has moments of other parameters than member 0's; resume a group "
                    "from the states of one group"
                )
            for i, moments in state["state"].items():
                got = moments["exp_avg"].shape
                if got not in (shapes[i][1:], shapes[i]) or got != states[0]["state"][i]["exp_avg"].shape:
                    raise ConfigError(
                        f"resume: {whose} holds moments of shape {list(got)} for {names[i]}, whose "
                        f"shape is {list(shapes[i][1:])}; was it saved with another model?"
                    )


def _first(stacked: torch.Tensor | dict[str, torch.Tensor]):
    """Member 0 of a stacked tensor or of a dict of them (views: gradients reach the stacked leaves)."""
    return {name: t[0] for name, t in stacked.items()} if isinstance(stacked, dict) else stacked[0]


def _stacked(key: str, value, shape: torch.Size, member: bool = False) -> bool:
    """Whether an AdamW state entry is per element (exp_avg, exp_avg_sq), not shared (step)."""
    want = shape[1:] if member else shape
    return key != "step" and isinstance(value, torch.Tensor) and value.shape == want
