"""Run under `accelerate launch` by test_distributed: few-shot features of one small set, each rank its share.

python tests/distributed_features.py OUT.npz
"""

import sys

import numpy as np
import torch
from accelerate.utils import gather_object

from vit_pipelines.data import embedded
from vit_pipelines.data.cache import cache_images
from vit_pipelines.evaluation.features import extract_features
from vit_pipelines.models import VisionTransformer, ViTConfig
from vit_pipelines.training.loop import process_state


def model_and_images() -> tuple[VisionTransformer, object]:
    config = ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                       num_classes=10, representation_size=24)  # fmt: skip
    test = embedded.build_downstream("digits", image_size=16)["test"].select(range(101))  # 101: uneven shares
    return VisionTransformer.from_seed(config, 0), cache_images(test, "decode")[0]


def main(out: str) -> None:
    torch.set_num_threads(1)
    model, cache = model_and_images()
    seen = []
    forward = model.forward_features
    model.forward_features = lambda images, **kw: seen.append(len(images)) or forward(images, **kw)
    features, labels = extract_features(model, cache, "value_range(-1,1)", batch_size=16)
    per_rank = gather_object([sum(seen)])
    if process_state().is_main_process:
        np.savez(out, features=features, labels=labels, per_rank=np.array(per_rank))


if __name__ == "__main__":
    main(sys.argv[1])
