"""Nodes of the `fewshot` pipeline: frozen features of each downstream set, the ridge grid, the report."""

from __future__ import annotations

import logging
from typing import Any

import datasets
from matplotlib.figure import Figure

from vit_pipelines.data.cache import cache_images, label_array
from vit_pipelines.evaluation.features import cached_features
from vit_pipelines.evaluation.fewshot import fewshot_grid, fewshot_pool, pp_for_size
from vit_pipelines.evaluation.plots import plot_fewshot
from vit_pipelines.models import VisionTransformer
from vit_pipelines.pipelines.downstream import start_model
from vit_pipelines.training.loop import process_state, shares_per_rank

log = logging.getLogger(__name__)


def select_model(pretrained_model: VisionTransformer | None, params: dict[str, Any]) -> VisionTransformer:
    """`fewshot.checkpoint.path` if set (its head and pre-logits kept; a checkpoint without a head is fine:
    only features are used), else the latest pretraining output."""
    return start_model(pretrained_model, params, pipeline="fewshot", features_only=True)


def evaluate_dataset(
    model: VisionTransformer, train_raw: datasets.Dataset, test_raw: datasets.Dataset, params: dict[str, Any]
) -> dict[str, Any]:
    """Few-shot accuracy of `model` and of a randomly initialised model of the same shape (the baseline)."""
    size = model.config.image_size
    pp_cache = pp_for_size(params["pp_cache"], size)
    pool = fewshot_pool(label_array(train_raw), params.get("max_train_per_class"))
    train_cache, train_report = cache_images(train_raw.select(pool), pp_cache)
    test_cache, test_report = cache_images(test_raw, pp_cache)
    models = {
        "pretrained": model,
        "random_init": VisionTransformer.from_seed(model.config, params["baseline_seed"]),
    }
    results: dict[str, Any] = {
        "image_size": list(size),
        "train_images": len(train_cache),
        "test_images": len(test_cache),
        "skipped_images": train_report["skipped"] | test_report["skipped"],
        "feature_images_per_rank": [
            a + b
            for a, b in zip(shares_per_rank(len(train_cache)), shares_per_rank(len(test_cache)), strict=True)
        ],
    }
    device = process_state().device  # each rank's accelerator, where it has one
    for kind, net in models.items():
        net = net.to(device)
        train = cached_features(net, train_cache, params["pp"], params["features_dir"], f"{kind}-train")
        test = cached_features(net, test_cache, params["pp"], params["features_dir"], f"{kind}-test")
        results["num_classes"] = int(max(train[1].max(), test[1].max())) + 1
        results[kind] = fewshot_grid(
            train, test, params["shots"], params["seeds"], params["l2_reg"], params.get("l2_grid")
        )
    return results


def report(**per_dataset: dict[str, Any]) -> tuple[dict[str, Any], Figure]:
    """`fewshot_results.json` (every dataset, shot count and seed) and a plot of accuracy against shots."""
    summary = {}
    for name, result in per_dataset.items():
        rows = {
            k: (result["pretrained"][k]["mean"], result["random_init"][k]["mean"])
            for k in result["pretrained"]
        }
        summary[name] = {
            "pretrained_beats_random_at_every_shot": all(p > r for p, r in rows.values()),
            "chance": 1.0 / result["num_classes"],
        }
        log.info(
            "%s few-shot accuracy (pretrained vs random init): %s",
            name,
            ", ".join(f"{k}-shot {p:.3f} vs {r:.3f}" for k, (p, r) in rows.items()),
        )
    return {"datasets": per_dataset, "summary": summary}, plot_fewshot(per_dataset)
