"""Nodes of the `vtab` pipeline: thin wrappers over `evaluation.vtab`, `evaluation.finetune` and `data`.

A task that fails (a missing source, bad data) returns `{"error": …}` instead of raising, so the other tasks
finish and the report lists it. Every training run keeps its final checkpoint: a re-run skips finished runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets
from matplotlib.figure import Figure

from vit_pipelines.data.cache import cache_images
from vit_pipelines.evaluation.finetune import accuracy_as_trained, finetune
from vit_pipelines.evaluation.vtab import (
    Task,
    load_task_splits,
    mean_val_scores,
    plot_vtab,
    select_setting,
    setting_name,
    summarise,
    task_classes,
    train_pp,
)
from vit_pipelines.models import VisionTransformer
from vit_pipelines.models.surgery import for_finetuning
from vit_pipelines.pipelines.downstream import start_model
from vit_pipelines.training.loop import TrainConfig

log = logging.getLogger(__name__)


def select_model(pretrained_model: VisionTransformer | None, params: dict[str, Any]) -> VisionTransformer:
    """`vtab.checkpoint.path` if set, else the latest pretraining output (the head is replaced per task)."""
    return start_model(pretrained_model, params, pipeline="vtab", num_classes=1)


def _splits(task: Task, params: dict[str, Any]) -> dict[str, datasets.Dataset]:
    return load_task_splits(
        task, params["seed"], params["train_size"], params["val_size"], params.get("test_limit")
    )


def _decoded(raw: dict[str, datasets.Dataset], names: tuple[str, ...], params: dict[str, Any]) -> list:
    """The splits `names` decoded and resized once (`params["pp_cache"]`); the others are left alone."""
    return [cache_images(raw[name], params["pp_cache"])[0] for name in names]


def _train_and_score(
    pretrained: VisionTransformer,
    task: Task,
    train: datasets.Dataset,
    score_on: datasets.Dataset,
    classes: int,
    setting: dict[str, Any],
    params: dict[str, Any],
) -> float:
    """Fine-tune `pretrained` on `train` with `setting` (lr, steps) and return the accuracy on `score_on`."""
    size = params["image_size"]
    pp = train_pp(task, size, **params["pp_train"])
    config = TrainConfig.from_params({**params["train"], **setting, "pp_train": pp})
    model = for_finetuning(pretrained, size, classes, params["resize_method"])
    run_dir = Path(params["checkpoint_dir"]) / task.name
    run = finetune(model, train, config, run_dir, description=f"{task.name} {setting_name(setting)}")
    pp_eval = params["eval"]["pp"].format(size=size)
    return accuracy_as_trained(
        run.model, score_on, pp_eval, params["eval"]["batch_size"], config.mixed_precision
    )


def sweep_task(pretrained: VisionTransformer, params: dict[str, Any], *, task: str) -> dict[str, Any]:
    """val200 accuracy of every setting of `params["settings"]`, each trained on train800."""
    spec = Task.from_params(task, params["tasks"][task])
    try:
        raw = _splits(spec, params)
        train800, val200 = _decoded(raw, ("train800", "val200"), params)  # test waits for the final run
        classes = task_classes(spec, train800, val200, raw["test"])
        scores = {
            setting_name(s): _train_and_score(pretrained, spec, train800, val200, classes, s, params)
            for s in params["settings"]
        }
    except Exception as err:  # reported, so that the other tasks still finish
        log.exception("VTAB task %s failed during the sweep", task)
        return {"task": task, "group": spec.group, "error": f"{type(err).__name__}: {err}"}
    log.info("%s val200: %s", task, scores)
    return {"task": task, "group": spec.group, "val200": scores, "num_classes": classes}


def choose_setting(params: dict[str, Any], **sweeps: dict[str, Any]) -> dict[str, Any]:
    """ONE setting for every task: the best mean val200 accuracy over the tasks whose sweep finished."""
    names = [setting_name(s) for s in params["settings"]]
    scores = {task: sweep["val200"] for task, sweep in sweeps.items() if "val200" in sweep}
    chosen, means = select_setting(scores, names), mean_val_scores(scores, names)
    log.info("VTAB setting chosen by mean val200 over %d tasks: %s (%s)", len(scores), chosen, means)
    return {"setting": chosen, "mean_val200": means, "tasks": sorted(scores)}


def final_task(
    pretrained: VisionTransformer,
    params: dict[str, Any],
    sweep: dict[str, Any],
    choice: dict[str, Any],
    *,
    task: str,
) -> dict[str, Any]:
    """Retrain on train800val200 with the chosen setting; accuracy on the full test split."""
    if "error" in sweep:
        return {**sweep, "test_accuracy": None}
    spec = Task.from_params(task, params["tasks"][task])
    setting = next(s for s in params["settings"] if setting_name(s) == choice["setting"])
    try:
        train, test = _decoded(_splits(spec, params), ("train800val200", "test"), params)
        accuracy = _train_and_score(pretrained, spec, train, test, sweep["num_classes"], setting, params)
    except Exception as err:  # reported, so that the other tasks still finish
        log.exception("VTAB task %s failed in its final run", task)
        return {**sweep, "test_accuracy": None, "error": f"{type(err).__name__}: {err}"}
    log.info("%s test accuracy %.4f (%s)", task, accuracy, choice["setting"])
    return {
        **sweep,
        "setting": choice["setting"],
        "test_accuracy": accuracy,
        "train_images": len(train),
        "test_images": len(test),
        "flip": spec.flip,
        "crop": spec.crop,
    }


def report(
    params: dict[str, Any], choice: dict[str, Any], **results: dict[str, Any]
) -> tuple[dict[str, Any], Figure]:
    """`vtab_results.json` (per task: group, chosen setting, val200 of every setting, test accuracy; per group
    mean; overall mean) and the per-group bar plot."""
    summary = summarise(results)
    log.info(
        "VTAB mean test accuracy %s over %d tasks; per group %s",
        summary["mean"],
        len(summary["finished"]),
        summary["group_mean"],
    )
    metrics = {
        "tasks": results,
        **summary,
        "chosen_setting": choice,
        "image_size": params["image_size"],
        "settings": [setting_name(s) for s in params["settings"]],
    }
    standin = all(params["tasks"][name]["source"].startswith("embedded:") for name in results)
    suite = "VTAB-1k protocol on the embedded offline stand-in suite" if standin else "VTAB-1k"
    return metrics, plot_vtab(results, summary, suite)
