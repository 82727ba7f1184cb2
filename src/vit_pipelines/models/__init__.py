"""Pure-torch models: the Vision Transformer, and BiT ResNets (its hybrid stem and the baseline classifier)."""

from vit_pipelines.models.build import build_classifier
from vit_pipelines.models.checkpoints import export_hf, load_pretrained
from vit_pipelines.models.config import BiTConfig, ViTConfig
from vit_pipelines.models.posemb import resize_pos_embed
from vit_pipelines.models.resnet import BiTResNet
from vit_pipelines.models.vit import VisionTransformer

__all__ = [
    "BiTConfig",
    "BiTResNet",
    "ViTConfig",
    "VisionTransformer",
    "build_classifier",
    "export_hf",
    "load_pretrained",
    "resize_pos_embed",
]
