"""Nodes of the `drloc` pipeline: does the DRLoc auxiliary loss help the pretraining model from scratch?"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import datasets
from matplotlib.figure import Figure

from vit_pipelines.data.cache import num_classes
from vit_pipelines.evaluation.classification import evaluate_accuracy
from vit_pipelines.evaluation.plots import plot_drloc_comparison
from vit_pipelines.training.loop import TrainConfig, train

log = logging.getLogger(__name__)


def compare_drloc(
    train_cache: datasets.Dataset,
    minival: datasets.Dataset,
    pretrain: dict[str, Any],
    experiment: dict[str, Any],
) -> tuple[dict[str, Any], Figure]:
    """Train `pretrain`'s model and budget from scratch once without and once with `experiment["drloc"]` per
    seed in `experiment["seeds"]` (the seed sets the initial weights, the data order and augmentation), then
    score each on the held-out minival split. Every run checkpoints, so an interrupted experiment resumes."""
    if TrainConfig.from_params(pretrain["train"]).objective != "classification":
        raise ValueError("the DRLoc experiment needs pretrain.train.objective: classification")
    pp, batch = pretrain["eval"]["pp"], pretrain["eval"]["batch_size"]
    runs = []
    for seed in experiment["seeds"]:
        for drloc in (None, experiment["drloc"]):
            name = f"{'with' if drloc else 'without'} DRLoc, seed {seed}"
            params = {**pretrain["train"], "seed": seed, "drloc": drloc, "eval_every": 0}
            config = TrainConfig.from_params(params)
            model = config.build_model(pretrain["model"], num_classes(train_cache))
            result = train(
                model, train_cache, config, checkpoint_dir=experiment["checkpoint_dir"], description=name
            )
            accuracy = evaluate_accuracy(result.model, minival, pp, batch)
            logs = [r for r in result.history if "loss" in r]
            log.info("%s: minival accuracy %.4f", name, accuracy)
            runs.append(
                {
                    "seed": seed,
                    "drloc": drloc is not None,
                    "minival_accuracy": accuracy,
                    "final_train_loss": logs[-1].get("classification_loss", logs[-1]["loss"]),
                    "final_drloc_loss": logs[-1].get("drloc_loss"),
                    "train_images_per_second": result.images_per_second,
                    "curve": [
                        {"step": r["step"], **{k: r[k] for k in r if k.endswith("loss")}} for r in logs
                    ],
                }
            )
    results = {
        "drloc": experiment["drloc"],
        "steps": pretrain["train"]["steps"],
        "global_batch_size": pretrain["train"]["batch_size"],
        "model": pretrain["model"],
        "minival_images": len(minival),
        "chance_accuracy": 1.0 / num_classes(train_cache),
        "summary": summarise_drloc(runs),
        "runs": runs,
    }
    return results, plot_drloc_comparison(runs)


def summarise_drloc(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread of minival accuracy per arm, the paired (same seed) differences and their mean."""
    arms = {
        arm: [r["minival_accuracy"] for r in runs if r["drloc"] == with_drloc]
        for arm, with_drloc in (("without", False), ("with", True))
    }
    by_seed = {(r["seed"], r["drloc"]): r["minival_accuracy"] for r in runs}
    differences = [by_seed[seed, True] - by_seed[seed, False] for seed, drloc in by_seed if drloc]
    summary = {
        arm: {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values,
        }
        for arm, values in arms.items()
    }
    summary["difference"] = {
        "mean": statistics.fmean(differences),
        "per_seed": differences,
        "with_drloc_better_on": sum(d > 0 for d in differences),
        "seeds": len(differences),
    }
    return summary
