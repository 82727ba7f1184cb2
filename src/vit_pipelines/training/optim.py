"""Optimisers and learning-rate schedules as the paper and big_vision set them up."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: kernels (decayed) and everything else — biases, norm scales, position embeddings,
    the [class] and [mask] tokens — with no decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or any(part in name for part in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """`adam`: AdamW, decoupled decay `p -= lr(t) * weight_decay * p` on kernels only. `weight_decay` is the
    paper's number (Table 3: 0.1 JFT, 0.03 ImageNet-21k); big_vision writes the same run as
    `config.wd = weight_decay * lr` because it scales decay by the schedule but not by the base lr.
    `sgd`: momentum SGD (fine-tuning uses no decay). `fused`: AdamW's one-kernel update, for parameters on CPU or
    CUDA: one pass over all parameters instead of a loop per tensor."""
    if name == "adam":
        groups = param_groups(model, weight_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=1e-8, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def lr_multiplier(
    step: int, total_steps: int, warmup_steps: int = 0, decay: str = "cosine", end: float = 0.0
) -> float:
    """big_vision's schedule as a fraction of the base lr at `step` (0-based): linear warmup from 0 over
    `warmup_steps`, then `cosine`, `linear` (down to `end`) or `constant`."""
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"decay must be cosine, linear or constant, got {decay!r}")
    warmup = min(1.0, step / warmup_steps) if warmup_steps else 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if decay == "cosine":
        value = end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        value = end + (1.0 - end) * (1.0 - progress)
    else:
        value = 1.0
    return warmup * value
