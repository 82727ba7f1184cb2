"""Data loading throughput against the model's: can the loader ever starve the training step?

The `pretrain` default reads its preprocessed Arrow cache (embedded images resized to 36 px) through the train
ops `random_crop(32)|value_range(-1,1)` in the training process (`num_workers: 0`). This benchmark builds that
cache for a slice of the embedded pretraining set, times `train_loader` alone, then one training step of the
default `pretrain` model (conf/base/parameters_pretrain.yml: its shape, batch and precision) on the same
batches, and reports the ratio (goal: loading ≥ 10x the model's images/s).

    python benchmarks/data_loading.py

Prints a table and writes `benchmarks/results/data_loading.json` (`benchmarks/run.py` runs everything).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from report import machine, print_table, write_json

from vit_pipelines.data import embedded
from vit_pipelines.data.cache import cache_images
from vit_pipelines.data.loader import train_loader
from vit_pipelines.training.loop import TrainConfig, make_accelerator

PARAMETERS = Path(__file__).resolve().parents[1] / "conf" / "base" / "parameters_pretrain.yml"


def loader_images_per_second(cache, pp: str, batch: int, batches: int) -> float:
    loader = train_loader(cache, pp, batch, batches + 2, seed=0)
    it = iter(loader)
    next(it), next(it)  # warm-up: Arrow pages, the pp ops
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch * batches / (time.perf_counter() - start)


def model_images_per_second(params: dict[str, Any], cache, batch: int, steps: int) -> float:
    """The default pretrain model's training step (objective, its optimiser, clipping) under the default precision,
    set up as `train` sets it up (fused AdamW, glibc keeping freed memory)."""
    config = TrainConfig.from_params(params["train"])
    model = config.build_model(params["model"], 1000)
    objective = config.build_objective(model)
    accelerator = make_accelerator(config.mixed_precision)
    optimizer = config.build_optimizer(objective, accelerator.device)
    prepared, optimizer = accelerator.prepare(objective, optimizer)
    loader = train_loader(cache, config.pp_train, batch, 2, seed=0)
    batches = [{**b, "images": loader.dataset.on_device(b["images"])} for b in loader]

    def step(b: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = prepared(b["images"], b["labels"]).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(prepared.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step(batches[0]), step(batches[1])
    start = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % 2])
    loss.item()
    return batch * steps / (time.perf_counter() - start)


def run(images: int = 8192, batches: int = 40, model_steps: int = 8) -> dict[str, Any]:
    params = yaml.safe_load(PARAMETERS.read_text())["pretrain"]
    start = time.perf_counter()
    cache, _ = cache_images(embedded.build_pretrain(images), params["data"]["pp_cache"])
    build_seconds = time.perf_counter() - start
    batch, pp = params["train"]["batch_size"], params["train"]["pp_train"]
    loading = loader_images_per_second(cache, pp, batch, batches)
    model = model_images_per_second(params, cache, batch, model_steps)
    return {
        "benchmark": "data_loading",
        "machine": machine(),
        "cache": {"images": images, "pp_cache": params["data"]["pp_cache"], "build_seconds": build_seconds},
        "pp_train": pp,
        "batch_size": batch,
        "num_workers": 0,
        "loader_images_per_second": loading,
        "model": params["model"],
        "model_train_images_per_second": model,
        "ratio": loading / model,
        "goal_ratio": 10.0,
    }


def report(result: dict[str, Any]) -> list[list[Any]]:
    rows = [
        [f"train_loader ({result['pp_train']})", result["loader_images_per_second"]],
        [
            f"pretrain model step ({result['model']['variant']}, depth {result['model'].get('depth', 12)})",
            result["model_train_images_per_second"],
        ],  # fmt: skip
        ["ratio (goal >= 10)", result["ratio"]],
    ]
    print_table("data loading vs training at 32 px (one process)", ["", "img/s"], rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--out", default="benchmarks/results/data_loading.json")
    args = parser.parse_args()
    result = run(args.images)
    report(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
