"""`kedro run --pipelines pretrain`: preprocess → train → evaluate on the pretraining dataset."""

from vit_pipelines.pipelines.pretrain.pipeline import create_pipeline

__all__ = ["create_pipeline"]
