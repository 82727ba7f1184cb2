"""vit-pipelines: the Vision Transformer paper's system as Kedro pipelines over Accelerate."""

import os

if os.environ.get("RANK", "0") != "0":  # a non-main rank of `accelerate launch`: no progress bars
    os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is first imported, so set here

__version__ = "0.1.0"
