"""Nodes of the `finetune` pipeline: thin wrappers over `models.surgery`, `data.cache` and `evaluation.finetune`."""

from __future__ import annotations

import logging
from typing import Any

import datasets
from matplotlib.figure import Figure

from vit_pipelines.data.cache import cache_images, num_classes
from vit_pipelines.evaluation.finetune import best_lr, dev_accuracies, finetune_and_test, plot_finetune
from vit_pipelines.models import VisionTransformer
from vit_pipelines.models.surgery import for_finetuning
from vit_pipelines.pipelines.downstream import start_model
from vit_pipelines.training.loop import TrainConfig

log = logging.getLogger(__name__)


def select_model(pretrained_model: VisionTransformer | None, params: dict[str, Any]) -> VisionTransformer:
    """`finetune.checkpoint.path` if set, else the latest pretraining output. A one-class placeholder head lets
    headless checkpoints load; fine-tuning replaces every head anyway."""
    return start_model(pretrained_model, params, pipeline="finetune", num_classes=1)


def from_scratch_model(pretrained: VisionTransformer, params: dict[str, Any]) -> VisionTransformer:
    """The same architecture, randomly initialised (seeded by `params["seed"]`): fine-tuned with the same grid
    and budget, it is the baseline that shows what pretraining is worth."""
    return VisionTransformer.from_seed(pretrained.config, params["seed"])


def cache_splits(
    train_raw: datasets.Dataset, test_raw: datasets.Dataset, params: dict[str, Any]
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Decode and resize train and test once, for the fine-tuning resolution (`params["pp_cache"]`)."""
    caches = []
    for split, raw in (("train", train_raw), ("test", test_raw)):
        cache, report = cache_images(raw, params["pp_cache"])
        if report["skipped"]:
            log.warning(
                "skipped %s of %d %s images: %s",
                sum(report["skipped"].values()),
                len(raw),
                split,
                report["skipped"],
            )
        caches.append(cache)
    return caches[0], caches[1]


def _model(
    pretrained: VisionTransformer, train_cache: datasets.Dataset, params: dict[str, Any]
) -> VisionTransformer:
    return for_finetuning(pretrained, params["image_size"], num_classes(train_cache), params["resize_method"])


def sweep_learning_rates(
    pretrained: VisionTransformer,
    train_cache: datasets.Dataset,
    dev: datasets.Dataset,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Dev accuracy of every learning rate in `params["lr_grid"]`, fine-tuning on train minus dev."""
    # the LR is chosen on the raw weights; only the final run keeps an EMA
    configs = [
        TrainConfig.from_params({**params["train"], "lr": lr, "ema_decay": None}) for lr in params["lr_grid"]
    ]
    scores = dev_accuracies(
        _model(pretrained, train_cache, params),
        train_cache,
        dev,
        configs,
        params["eval"]["pp"],
        params["eval"]["batch_size"],
        params.get("checkpoint_dir"),
    )
    log.info("dev accuracy per learning rate: %s", ", ".join(f"{lr:g}: {a:.3f}" for lr, a in scores.items()))
    return {"dev_accuracy": scores, "dev_train_images": len(train_cache), "dev_images": len(dev)}


def finetune_best(
    pretrained: VisionTransformer,
    train_cache: datasets.Dataset,
    test_cache: datasets.Dataset,
    sweep: dict[str, Any],
    params: dict[str, Any],
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Fine-tune on all of train with the best dev learning rate; the model (EMA weights when kept, as the
    paper's headline results) and its results."""
    lr = best_lr(sweep["dev_accuracy"])
    config = TrainConfig.from_params({**params["train"], "lr": lr})
    model = _model(pretrained, train_cache, params)
    run, scores = finetune_and_test(
        model,
        train_cache,
        test_cache,
        config,
        params["eval"]["pp"],
        params["eval"]["batch_size"],
        params.get("checkpoint_dir"),
    )
    log.info(
        "lr %g: test accuracy %.4f raw, %s EMA", lr, scores["test_accuracy"], scores["test_accuracy_ema"]
    )
    result = {
        "chosen_lr": lr,
        **sweep,
        **scores,
        "image_size": list(model.config.image_size),
        "pretrain_image_size": list(pretrained.config.image_size),
        "num_classes": model.config.num_classes,
        "steps": config.steps,
        "global_batch_size": config.batch_size,
        "ema_decay": config.ema_decay,
        "saved_weights": "raw" if run.ema_model is None else "ema",
        "train_images": len(train_cache),
        "test_images": len(test_cache),
        "train_images_per_second": run.images_per_second,  # of the final run, every session of it
        "history": run.history,
    }
    return (run.ema_model if run.ema_model is not None else run.model), result


def with_baseline(pretrained: dict[str, Any], scratch: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning result with, under `from_scratch`, the same grid, budget and resolution started from
    random weights, and `pretraining_gain`: the test accuracy (EMA where kept) pretraining adds."""
    kept = ("chosen_lr", "dev_accuracy", "test_accuracy", "test_accuracy_ema")
    baseline = {k: scratch[k] for k in kept}
    final = "test_accuracy" if pretrained["test_accuracy_ema"] is None else "test_accuracy_ema"
    gain = pretrained[final] - scratch[final]
    log.info(
        "test accuracy %.4f fine-tuned vs %.4f from scratch (%s)", pretrained[final], scratch[final], final
    )
    return {**pretrained, "from_scratch": baseline, "pretraining_gain": gain}


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: v for k, v in result.items() if k != "history"},
        "dev_accuracy": {str(lr): acc for lr, acc in sorted(result["dev_accuracy"].items())},
    }


def report(**per_dataset: dict[str, Any]) -> tuple[dict[str, Any], Figure]:
    """`finetune_metrics.json` (per dataset: chosen LR, dev accuracy per LR, test accuracy raw and EMA, sizes,
    the from-scratch baseline) and the curves of the final runs beside the dev accuracy of every LR."""
    metrics = {
        name: {
            **_jsonable(result),
            "from_scratch": _jsonable(result["from_scratch"]),
            "chance": 1.0 / result["num_classes"],
        }
        for name, result in per_dataset.items()
    }
    return metrics, plot_finetune(per_dataset)
