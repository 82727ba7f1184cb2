"""Classification losses: softmax cross-entropy (paper) and sigmoid cross-entropy (later big_vision)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# big_vision initialises the head bias so sigmoids start near 0 (sigmoid(-10) ≈ 4.5e-5).
SIGMOID_HEAD_BIAS = -10.0


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, kind: str = "softmax", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean over the batch of `logits` `[B, K]` against integer `labels` `[B]`.

    `sigmoid` sums independent binary cross-entropies over the K classes (big_vision's `sigmoid_xent`).
    """
    if kind == "softmax":
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if kind == "sigmoid":
        k = logits.shape[-1]
        targets = F.one_hot(labels, k).float() * (1.0 - label_smoothing) + label_smoothing / k
        per_class = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        return per_class.sum(dim=-1).mean()
    raise ValueError(f"loss must be 'softmax' or 'sigmoid', got {kind!r}")
