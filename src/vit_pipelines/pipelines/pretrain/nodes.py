"""Nodes of the `pretrain` pipeline: thin wrappers over `data`, `models`, `training` and `evaluation`."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import datasets
import numpy as np
from matplotlib.figure import Figure

from vit_pipelines.data.cache import (
    ShardBuild,
    check_class_ids,
    label_array,
    num_classes,
    read_manifest,
    resolve_num_proc,
    split_rows,
)
from vit_pipelines.data.streaming import StreamedImages
from vit_pipelines.evaluation.classification import HeldOutAccuracy, evaluate_accuracy
from vit_pipelines.evaluation.fewshot import FewshotProbe, cache_fewshot_sets, pp_for_size
from vit_pipelines.evaluation.plots import plot_curves
from vit_pipelines.models import VisionTransformer
from vit_pipelines.models.build import is_bit_variant
from vit_pipelines.training.loop import TrainConfig, make_accelerator, process_state, shares_per_rank, train
from vit_pipelines.training.objectives import MASKED_PATCH_CLASSES

log = logging.getLogger(__name__)


def prepare_cache(
    raw: datasets.Dataset | StreamedImages, duplicates: dict, params: dict[str, Any]
) -> tuple[ShardBuild, ShardBuild]:
    """The pretraining images minus the test-set duplicates, split into train and a stratified minival
    (`params["minival_fraction"]`), each to be written once as a `params["storage"]` cache (see data.cache):
    the catalog writes them, every rank its share of the shards."""
    keep = np.ones(len(raw), bool)
    keep[[m["pretrain_index"] for m in duplicates["matches"]]] = False
    kept = np.flatnonzero(keep)
    labels = label_array(raw)[kept]
    check_class_ids(labels, raw.features["label"])  # stray labels stop here, before the cache is written
    train_rows, minival_rows = split_rows(labels, params["minival_fraction"], params.get("seed", 0))
    options = {
        "storage": params.get("storage", "encoded"),
        "pp": params.get("pp_cache"),
        "shard_bytes": int(params.get("shard_mb", 256) * 2**20),
        "num_proc": resolve_num_proc(params.get("num_proc", "auto"), process_state().num_processes),
    }
    return (
        ShardBuild(raw, kept[train_rows], name="train", **options),
        ShardBuild(raw, kept[minival_rows], name="minival", **options),
    )


def report_cache(train: datasets.Dataset, minival: datasets.Dataset) -> dict[str, Any]:
    """What preprocessing kept and skipped (by reason, the first few named), bytes and shards, build time."""
    parts = {"train": read_manifest(train), "minival": read_manifest(minival)}
    report = {
        "storage": parts["train"]["storage"],
        "pp": parts["train"]["pp"],
        "images_in": sum(p["images_in"] for p in parts.values()),
        "images_kept": sum(p["images_kept"] for p in parts.values()),
        "skipped": dict(sum((Counter(p["skipped"]) for p in parts.values()), Counter())),
        "train_images": len(train),
        "minival_images": len(minival),
        "num_classes": num_classes(train),
        "bytes": sum(p["bytes"] for p in parts.values()),
        "source_bytes": sum(p["source_bytes"] for p in parts.values()),
        "build_seconds": round(sum(p["build_seconds"] for p in parts.values()), 2),
        **parts,
    }
    report["bytes_per_image"] = round(report["bytes"] / max(report["images_kept"], 1), 1)
    report["bytes_over_source"] = round(report["bytes"] / max(report["source_bytes"], 1), 4)
    skipped = sum(report["skipped"].values())
    if skipped:
        log.warning("skipped %d of %d images: %s", skipped, report["images_in"], report["skipped"])
    megabytes, ratio = report["bytes"] / 1e6, report["bytes_over_source"]
    log.info("image cache: %d images, %.1f MB, %.2fx the source", report["images_kept"], megabytes, ratio)
    return report


def pretrain(
    train_cache: datasets.Dataset,
    minival: datasets.Dataset,
    params: dict[str, Any],
    **downstream: datasets.Dataset,
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Train from scratch; resumes from the newest periodic checkpoint of the same configuration.

    `downstream` holds `<set>_train` / `<set>_test` image datasets: every `train.eval_every` steps the run
    probes its representation with few-shot ridge on them (paper Fig. 4), beside the minival accuracy.
    """
    config = TrainConfig.from_params(params["train"])
    if is_bit_variant(params["model"]["variant"]):
        raise ValueError(
            f"pretrain.model.variant {params['model']['variant']!r} is a BiT ResNet: this pipeline saves ViTs for "
            "the transfer pipelines; BiT ResNets train and transfer in `kedro run --pipelines scaling`"
        )
    classes = MASKED_PATCH_CLASSES if config.objective == "masked_patch" else num_classes(train_cache)
    model = config.build_model(params["model"], classes)
    objective = config.build_objective(model)
    pp_eval, eval_batch = params["eval"]["pp"], params["eval"]["batch_size"]
    probe = params.get("fewshot") or {}
    names = sorted({key.rsplit("_", 1)[0] for key in downstream}) if probe.get("enabled") else []
    pp_cache = pp_for_size(probe.get("pp_cache", ""), model.config.image_size)
    sets = cache_fewshot_sets(
        {n: (downstream[f"{n}_train"], downstream[f"{n}_test"]) for n in names},
        pp_cache,
        probe.get("max_train_per_class"),
    )

    evaluators = {"minival_accuracy": HeldOutAccuracy(objective, minival, pp_eval, eval_batch)}
    if sets:
        evaluators["fewshot"] = FewshotProbe(
            sets, probe["pp"], probe["shots"], probe["seeds"], probe["l2_reg"]
        )
    log.info(
        "pretraining %s (%.1fM parameters) for %d steps",
        model.config.variant,
        sum(p.numel() for p in model.parameters()) / 1e6,
        config.steps,
    )
    result = train(
        model,
        train_cache,
        config,
        checkpoint_dir=params.get("checkpoint_dir"),
        evaluators=evaluators,
        description="pretrain",
        objective=objective,
    )
    label = train_cache.features.get("label")
    if config.objective != "masked_patch" and isinstance(label, datasets.ClassLabel):
        result.model.class_names = label.names  # saved beside the weights as labels.json
    history = {
        "records": result.history,
        "wall_seconds": result.wall_seconds,
        "train_images_per_second": result.images_per_second,
        "resumed_from_step": result.resumed_from_step,
    }
    return result.model, history


def evaluate(
    model: VisionTransformer, minival: datasets.Dataset, history: dict[str, Any], params: dict[str, Any]
) -> tuple[dict[str, Any], Figure]:
    """Final minival accuracy beside the run's facts, and the training curves. For masked patch prediction
    the accuracy is the colour accuracy measured at the last step (it needs the objective's [mask] token)."""
    records = history["records"]
    config = TrainConfig.from_params(params["train"])
    objective = config.objective
    if objective == "masked_patch":
        accuracy = next(r["minival_accuracy"] for r in reversed(records) if "minival_accuracy" in r)
    else:  # on each rank's device in the training precision, every rank a contiguous share of the rows
        accelerator = make_accelerator(config.mixed_precision)
        model = model.to(accelerator.device)
        pp, batch_size = params["eval"]["pp"], params["eval"]["batch_size"]
        accuracy = evaluate_accuracy(model, minival, pp, batch_size, accelerator)
    train_logs = [r for r in records if "loss" in r]
    metrics = {
        "objective": objective,
        "minival_accuracy": accuracy,
        "minival_images": len(minival),
        "minival_images_per_rank": shares_per_rank(len(minival)) if objective != "masked_patch" else None,
        "num_classes": model.config.num_classes,
        "chance_accuracy": 1.0 / model.config.num_classes,
        "steps": params["train"]["steps"],
        "global_batch_size": params["train"]["batch_size"],
        "train_images_per_second": history["train_images_per_second"],
        "wall_seconds": history["wall_seconds"],
        "resumed_from_step": history["resumed_from_step"],
        "final_train_loss": train_logs[-1]["loss"] if train_logs else None,
        "data_wait_fraction": (
            sum(r.get("data_wait_fraction", 0.0) * r["seconds"] for r in train_logs)
            / max(sum(r["seconds"] for r in train_logs), 1e-9)
        ),
        "fewshot": {k: v for k, v in (records[-1] if records else {}).items() if k.startswith("fewshot_")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": model.config.to_dict(),
    }
    log.info("minival accuracy %.4f (chance %.4f)", accuracy, metrics["chance_accuracy"])
    title = f"{model.config.variant} pretraining, {len(minival)} minival images"
    return metrics, plot_curves(records, title, chance=metrics["chance_accuracy"])
