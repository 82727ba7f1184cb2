"""Accuracy over an Arrow image cache: top-1 of a classifier, or of any training objective."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
from accelerate import Accelerator
from torch import nn

from vit_pipelines.data.loader import eval_loader
from vit_pipelines.training.loop import rank_share, shares_per_rank
from vit_pipelines.training.objectives import Classification, MaskedPatchPrediction
from vit_pipelines.training.sharding import idle_forwards, is_sharded, placeholder_images


def evaluate_accuracy(
    model: nn.Module,
    cache: datasets.Dataset,
    pp: str,
    batch_size: int = 256,
    accelerator: Accelerator | None = None,
) -> float:
    """Fraction of `cache` rows whose argmax logit equals the label; with `accelerator`, every rank a
    contiguous share of the rows (collective: every rank must call it)."""
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
    device, idle = next(objective.parameters()).device, 0
    if accelerator is not None:  # each rank its contiguous share of the rows: no padding, no row twice
        rank = accelerator.process_index
        if is_sharded(objective.model):  # its ranks gather weights together: as many forward passes each
            idle = idle_forwards(shares_per_rank(len(cache)), batch_size, rank)
        cache = cache.select(rank_share(len(cache), rank, accelerator.num_processes))
        device = accelerator.device
    loader = eval_loader(cache, pp, batch_size) if len(cache) else None  # a rank may have no rows
    was_training = objective.training
    objective.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in loader or ():
            images = loader.dataset.on_device(batch["images"].to(device, non_blocking=True))
            labels = batch["labels"].to(device)
            with (
                accelerator.autocast()
                if accelerator is not None
                else torch.autocast(device.type, enabled=False)
            ):
                out = objective(images, labels)
            correct += out.correct.long().sum()
            seen += out.count.sum()
        for _ in range(idle):  # counted nowhere
            with accelerator.autocast():
                objective(
                    placeholder_images(objective.model, device),
                    torch.zeros(1, dtype=torch.long, device=device),
                )
    objective.train(was_training)
    if accelerator is not None:
        correct, seen = accelerator.reduce(torch.stack([correct, seen]), reduction="sum")
    return correct.item() / max(seen.item(), 1)


@dataclass
class HeldOutAccuracy:
    """`objective_accuracy` on held-out images as a training-loop evaluator: `(model, accelerator)` →
    `{"minival_accuracy": …}` (labels for classification, the corrupted patches' colours for masked patches)."""

    objective: Classification | MaskedPatchPrediction
    images: datasets.Dataset
    pp: str
    batch_size: int = 256

    def __call__(self, model: torch.nn.Module, accelerator: Accelerator) -> dict[str, float]:
        accuracy = objective_accuracy(self.objective, self.images, self.pp, self.batch_size, accelerator)
        return {"minival_accuracy": accuracy}
