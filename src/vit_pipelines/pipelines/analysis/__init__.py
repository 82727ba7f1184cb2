"""`kedro run --pipelines analysis`: the paper's Fig. 6 and 7 for the latest pretrained model."""

from vit_pipelines.pipelines.analysis.pipeline import create_pipeline

__all__ = ["create_pipeline"]
