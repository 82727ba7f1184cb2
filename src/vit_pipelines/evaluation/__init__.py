"""Evaluation of trained models."""

from vit_pipelines.evaluation.classification import evaluate_accuracy

__all__ = ["evaluate_accuracy"]
