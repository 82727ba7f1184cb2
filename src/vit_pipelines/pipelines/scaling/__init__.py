"""`kedro run --pipelines scaling`: ViT and BiT ResNet pretrained on growing subsets, then transferred (Fig. 3-5)."""

from vit_pipelines.pipelines.scaling.pipeline import create_pipeline

__all__ = ["create_pipeline"]
