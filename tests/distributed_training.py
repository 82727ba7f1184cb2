"""Run under `accelerate launch` by test_distributed (or in one process): a tiny float32 training run with EMA,
periodic checkpoints and sharded evaluation (minival accuracy and features over 33 rows in batches of 8, so
the ranks' shares take 2 and 3 batches).

python tests/distributed_training.py OUT.safetensors SHARDING CHECKPOINT_DIR [STOP_AFTER] [--recompute]
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vit_pipelines.data import embedded
from vit_pipelines.data.cache import cache_images
from vit_pipelines.evaluation.classification import HeldOutAccuracy
from vit_pipelines.evaluation.features import extract_features
from vit_pipelines.models import VisionTransformer, ViTConfig
from vit_pipelines.training import TrainConfig, train
from vit_pipelines.training.loop import process_state

PP = "value_range(-1,1)"


def setup(sharding: str, **overrides):
    config = ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                       num_classes=10, representation_size=24)  # fmt: skip
    model = VisionTransformer.from_seed(config, 0)
    with torch.random.fork_rng():  # the same on every rank
        torch.manual_seed(1)
        torch.nn.init.normal_(
            model.head.weight, std=0.1
        )  # a zero head would leave most gradients zero at step 1
    digits = embedded.build_downstream("digits", image_size=16)
    train_cache = cache_images(digits["train"].select(range(64)), "decode")[0]
    minival = cache_images(digits["test"].select(range(33)), "decode")[0]
    fields = dict(
        steps=6, batch_size=16, optimizer="sgd", lr=0.05, warmup_steps=1, weight_decay=0.1, mixed_precision="no", log_every=2,
        pp_train="random_crop(16)|flip_lr|value_range(-1,1)", ema_decay=0.5, checkpoint_every=2,
        sharding=sharding,
    )  # fmt: skip
    fields.update(overrides)
    return model, train_cache, minival, TrainConfig(**fields)


def main(out: str, sharding: str, checkpoint_dir: str, stop_after: str = "0", *flags: str) -> None:
    torch.set_num_threads(1)
    model, train_cache, minival, config = setup(sharding, activation_checkpointing="--recompute" in flags)
    objective = config.build_objective(model)

    def features(model, accelerator):
        values, labels = extract_features(model, minival, PP, batch_size=8)
        return {"sum": float(values.sum()), "rows": len(labels)}

    evaluators = {
        "minival_accuracy": HeldOutAccuracy(objective, minival, PP, batch_size=8),
        "features": features,
    }
    result = train(
        model,
        train_cache,
        config,
        checkpoint_dir=checkpoint_dir,
        evaluators=evaluators,
        stop_after=int(stop_after) or None,
        objective=objective,
    )
    if process_state().is_main_process:
        weights = {name: t.contiguous() for name, t in result.model.state_dict().items()}
        weights.update({f"ema.{k}": t.contiguous() for k, t in result.ema_model.state_dict().items()})
        save_file(weights, out)
        Path(out).with_suffix(".json").write_text(json.dumps(result.history[-1]))


if __name__ == "__main__":
    main(*sys.argv[1:])
