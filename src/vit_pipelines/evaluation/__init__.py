"""Evaluation of trained models: accuracy, few-shot linear ridge, plots."""

from vit_pipelines.evaluation.classification import evaluate_accuracy
from vit_pipelines.evaluation.ridge import fewshot_ridge

__all__ = ["evaluate_accuracy", "fewshot_ridge"]
