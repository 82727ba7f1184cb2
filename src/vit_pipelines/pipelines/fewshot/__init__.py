"""`kedro run --pipelines fewshot`: few-shot linear ridge evaluation of a checkpoint on every downstream set."""

from vit_pipelines.pipelines.fewshot.pipeline import create_pipeline

__all__ = ["create_pipeline"]
