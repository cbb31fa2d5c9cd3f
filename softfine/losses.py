"""The SoftFiNE training objective (section 4.2): L = L_soft + alpha_aug * L_aug + alpha_fea * L_fea.

Every term is a mean over the characters it covers, so the alphas weigh terms of comparable
size whatever the batch and sentence lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Equation 3, -sum_j y_j log p_j, averaged over rows.

    logits: (n, N) scores of n characters; targets: (n, N) soft (or one-hot) target rows.
    """
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def feature_kl(features: torch.Tensor, aug_features: torch.Tensor) -> torch.Tensor:
    """KL(softmax(h) || softmax(h_aug)) of entity characters' encoder features, averaged over them.

    features, aug_features: (n, hidden) for the n entity characters of the batch.
    """
    if features.shape[0] == 0:
        return features.new_zeros((), dtype=torch.float32)
    log_d = F.log_softmax(features.float(), dim=-1)
    log_d_aug = F.log_softmax(aug_features.float(), dim=-1)
    return F.kl_div(log_d_aug, log_d, log_target=True, reduction="batchmean")


def softfine_loss(logits: torch.Tensor, targets: torch.Tensor, *, aug_logits: torch.Tensor | None = None,
                  features: torch.Tensor | None = None, aug_features: torch.Tensor | None = None,
                  alpha_aug: float = 0.0, alpha_fea: float = 0.0) -> dict[str, torch.Tensor]:
    """The total loss and its parts. Rows are the batch's real characters; `features` and
    `aug_features` only those of entity characters. Without `aug_logits` the augmentation terms
    are zero (the paper's no-augmentation ablation)."""
    soft = soft_cross_entropy(logits, targets)
    zero = soft.new_zeros(())
    aug = soft_cross_entropy(aug_logits, targets) if aug_logits is not None else zero
    fea = feature_kl(features, aug_features) if features is not None else zero
    return {"loss": soft + alpha_aug * aug + alpha_fea * fea, "loss_soft": soft, "loss_aug": aug,
            "loss_fea": fea}
