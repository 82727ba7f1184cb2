"""Top-1 accuracy of a classifier over an Arrow image cache."""

from __future__ import annotations

import datasets
import torch
from accelerate import Accelerator
from torch import nn

from vit_pipelines.data.loader import eval_loader


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    cache: datasets.Dataset,
    pp: str,
    batch_size: int = 256,
    accelerator: Accelerator | None = None,
) -> float:
    """Fraction of `cache` rows whose argmax logit equals the label; all ranks share the work."""
    loader = eval_loader(cache, pp, batch_size)
    device = next(model.parameters()).device
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
        device = accelerator.device
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    for batch in loader:
        images, labels = batch["images"].to(device), batch["labels"].to(device)
        with (
            accelerator.autocast() if accelerator is not None else torch.autocast(device.type, enabled=False)
        ):
            predictions = model(images).argmax(dim=-1)
        if accelerator is not None:
            predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        correct += (predictions == labels).sum()
        seen += labels.numel()
    model.train(was_training)
    return correct.item() / max(seen.item(), 1)
