"""The SoftFiNE training objective (section 4.2): L = L_soft + alpha_aug * L_aug + alpha_fea * L_fea.

Every term is a mean over the characters it covers, so the alphas weigh terms of comparable
size whatever the batch and sentence lengths. Tensors keep the batch's padded shape and a mask
says which positions count: no boolean indexing, whose result's size the host must wait for on a
GPU, and the same shapes every step (for compiled steps and fused trials).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is true; 0 where it is true nowhere."""
    total = torch.where(mask, values, 0.0).sum()
    return total / mask.sum().clamp(min=1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Equation 3, -sum_j y_j log p_j, averaged over the characters in `mask`.

    logits: (..., N) scores; targets: (..., N) soft (or one-hot) target rows; mask: (...) bool.
    """
    return masked_mean(-(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1), mask)


def feature_kl(features: torch.Tensor, aug_features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(softmax(h) || softmax(h_aug)) of the encoder features, averaged over the entity
    characters in `mask`.

    features, aug_features: (..., hidden); mask: (...) bool.
    """
    log_d = F.log_softmax(features.float(), dim=-1)
    log_d_aug = F.log_softmax(aug_features.float(), dim=-1)
    return masked_mean((log_d.exp() * (log_d - log_d_aug)).sum(-1), mask)


def softfine_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    chars: torch.Tensor,
    *,
    aug_logits: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    aug_features: torch.Tensor | None = None,
    entities: torch.Tensor | None = None,
    alpha_aug: float | torch.Tensor = 0.0,
    alpha_fea: float | torch.Tensor = 0.0,
) -> dict[str, torch.Tensor]:
    """The total loss and its parts. `chars` marks the batch's real characters, `entities` its
    entity characters (for the feature loss). Without `aug_logits` the augmentation terms are
    zero (the paper's no-augmentation ablation)."""
    soft = soft_cross_entropy(logits, targets, chars)
    zero = soft.new_zeros(())
    aug = soft_cross_entropy(aug_logits, targets, chars) if aug_logits is not None else zero
    fea = feature_kl(features, aug_features, entities) if features is not None else zero
    return {
        "loss": soft + alpha_aug * aug + alpha_fea * fea,
        "loss_soft": soft,
        "loss_aug": aug,
        "loss_fea": fea,
    }
