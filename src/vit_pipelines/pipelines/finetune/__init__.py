"""`kedro run --pipelines finetune`: fine-tune a pretrained checkpoint on every downstream set (paper §3.2)."""

from vit_pipelines.pipelines.finetune.pipeline import create_pipeline

__all__ = ["create_pipeline"]
