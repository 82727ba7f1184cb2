"""The Accelerate training loop, optimisers, schedules, losses and checkpoints."""

from vit_pipelines.training.loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
