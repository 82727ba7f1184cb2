"""vit-pipelines: the Vision Transformer paper's system as Kedro pipelines over Accelerate."""

__version__ = "0.1.0"
