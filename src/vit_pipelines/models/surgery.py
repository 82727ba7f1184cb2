"""Checkpoint surgery on a model in memory: `load_pretrained`'s reconcile step without the round trip to disk."""

from __future__ import annotations

from vit_pipelines.models.checkpoints import reconcile
from vit_pipelines.models.vit import VisionTransformer


def for_finetuning(
    model: VisionTransformer,
    image_size: int | tuple[int, int],
    num_classes: int,
    resize_method: str = "zoom_bilinear",
) -> VisionTransformer:
    """A new model to fine-tune from `model` (paper §3.2): the position embedding resized to `image_size`
    (pixels, same patch size), the head replaced by ONE zero-initialised Linear(D→`num_classes`) and the
    pre-logits layer dropped. `model` itself is left untouched."""
    # num_classes=0 reads as "no head", so a fresh head is put even when K equals the pretraining one
    headless = model.config.replace(num_classes=0)
    return reconcile(headless, model.state_dict(), image_size, num_classes, resize_method)
