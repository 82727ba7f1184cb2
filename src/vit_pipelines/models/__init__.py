"""Pure-torch models: the Vision Transformer and its BiT ResNet hybrid stem."""

from vit_pipelines.models.config import ViTConfig
from vit_pipelines.models.vit import VisionTransformer

__all__ = ["ViTConfig", "VisionTransformer"]
