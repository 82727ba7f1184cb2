"""One constructor for the classifiers this project trains: a ViT or the BiT ResNet it is compared with."""

from __future__ import annotations

from typing import Any

from vit_pipelines.models.config import BiTConfig, ViTConfig
from vit_pipelines.models.resnet import BiTResNet
from vit_pipelines.models.vit import VisionTransformer

Classifier = VisionTransformer | BiTResNet


def is_bit_variant(variant: str) -> bool:
    """ "R50x1" names a BiT ResNet, "B/16" a ViT."""
    return variant.startswith("R") and "/" not in variant


def build_classifier(model_params: dict[str, Any], classes: int, seed: int = 0) -> Classifier:
    """`{"variant": "Ti/4" | "R26x0.5", "image_size": 32, **overrides}` → a ViT or BiT ResNet for `classes`,
    initialised from `seed` alone (not from whatever ran before in the process: every rank and every re-run
    starts the same)."""
    overrides = dict(model_params)
    variant, image_size = overrides.pop("variant"), overrides.pop("image_size")
    kind = BiTConfig if is_bit_variant(variant) else ViTConfig
    config = kind.from_variant(variant, image_size=image_size, num_classes=classes, **overrides)
    return (BiTResNet if kind is BiTConfig else VisionTransformer).from_seed(config, seed)
