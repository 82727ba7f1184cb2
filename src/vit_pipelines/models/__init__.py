"""Pure-torch models: the Vision Transformer and its BiT ResNet hybrid stem."""

from vit_pipelines.models.checkpoints import export_hf, load_pretrained
from vit_pipelines.models.config import ViTConfig
from vit_pipelines.models.posemb import resize_pos_embed
from vit_pipelines.models.vit import VisionTransformer

__all__ = ["ViTConfig", "VisionTransformer", "export_hf", "load_pretrained", "resize_pos_embed"]
