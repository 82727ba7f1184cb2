"""Accuracy over an Arrow image cache: top-1 of a classifier, or of any training objective."""

from __future__ import annotations

import datasets
import torch
from accelerate import Accelerator
from torch import nn

from vit_pipelines.data.loader import eval_loader
from vit_pipelines.training.objectives import Classification, MaskedPatchPrediction


def evaluate_accuracy(
    model: nn.Module,
    cache: datasets.Dataset,
    pp: str,
    batch_size: int = 256,
    accelerator: Accelerator | None = None,
) -> float:
    """Fraction of `cache` rows whose argmax logit equals the label; all ranks share the work."""
    return objective_accuracy(Classification(model), cache, pp, batch_size, accelerator)


@torch.no_grad()
def objective_accuracy(
    objective: Classification | MaskedPatchPrediction,
    cache: datasets.Dataset,
    pp: str,
    batch_size: int = 256,
    accelerator: Accelerator | None = None,
    seed: int = 0,
) -> float:
    """Correct predictions over everything `objective` predicts on `cache`: labels for classification,
    the corrupted patches' colours for masked patch prediction (its draws seeded by `seed`, the global RNG
    left as it was)."""
    loader = eval_loader(cache, pp, batch_size)
    finish = loader.dataset.on_device
    device = next(objective.parameters()).device
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
        device = accelerator.device
    was_training = objective.training
    objective.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in loader:
            images = finish(batch["images"].to(device, non_blocking=True))
            labels = batch["labels"].to(device)
            with (
                accelerator.autocast()
                if accelerator is not None
                else torch.autocast(device.type, enabled=False)
            ):
                out = objective(images, labels)
            right, count = out.correct.long(), out.count
            if accelerator is not None:
                right, count = accelerator.gather_for_metrics((right, count))
            correct += right.sum()
            seen += count.sum()
    objective.train(was_training)
    return correct.item() / max(seen.item(), 1)
