"""`kedro run --pipelines drloc`: the pretraining model trained from scratch with and without DRLoc."""

from vit_pipelines.pipelines.drloc.pipeline import create_pipeline

__all__ = ["create_pipeline"]
