"""Checkpoint surgery on a model in memory: `load_pretrained`'s reconcile step without the round trip to disk."""

from __future__ import annotations

from vit_pipelines.models.checkpoints import reconcile
from vit_pipelines.models.resnet import BiTResNet
from vit_pipelines.models.vit import VisionTransformer


def for_finetuning(
    model: VisionTransformer | BiTResNet,
    image_size: int | tuple[int, int],
    num_classes: int,
    resize_method: str = "zoom_bilinear",
) -> VisionTransformer | BiTResNet:
    """A new model to fine-tune from `model` (paper §3.2): the position embedding resized to `image_size`
    (pixels, same patch size), the head replaced by ONE zero-initialised Linear(D→`num_classes`) and the
    pre-logits layer dropped. `model` itself is left untouched. A BiT ResNet keeps everything but its head
    (BiT-HyperRule: a zero head), at any resolution."""
    if isinstance(model, BiTResNet):
        config = model.config.replace(num_classes=num_classes, image_size=image_size, head_bias_init=0.0)
        tuned = BiTResNet(config)
        body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        tuned.load_state_dict({**tuned.state_dict(), **body})
        return tuned
    # num_classes=0 reads as "no head", so a fresh head is put even when K equals the pretraining one
    headless = model.config.replace(num_classes=0)
    return reconcile(headless, model.state_dict(), image_size, num_classes, resize_method)
