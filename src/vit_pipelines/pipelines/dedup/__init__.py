"""`kedro run --pipelines dedup`: remove near-duplicates of downstream test images from the pretraining set."""

from vit_pipelines.pipelines.dedup.pipeline import create_pipeline

__all__ = ["create_pipeline"]
