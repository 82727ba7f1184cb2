"""The paper's studies as runs of one shape: pretrain a model on (a subset of) the pretraining images, then score
it by minival accuracy, the linear few-shot probe on every downstream set (Fig. 4) and fine-tuning on them
(Fig. 3), with the pretraining compute it cost (Fig. 5). `scaling` varies the model and the subset, `ablations`
the position embedding and the head (Table 8, Fig. 9).

Every seed's result is stored under `runs_dir/<key>/` with key = hash(everything that decides it): a re-run
skips finished seeds, an interrupted one resumes from its training checkpoint, and two arms of the same settings
(the ablations' [class]-token arm and their 1-D position-embedding arm) train once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vit_pipelines.data.cache import cache_images, num_classes
from vit_pipelines.evaluation.classification import evaluate_accuracy
from vit_pipelines.evaluation.fewshot import cache_fewshot_sets, fewshot_accuracies, pp_for_size
from vit_pipelines.evaluation.finetune import finetune_and_test
from vit_pipelines.fields import check_known_names
from vit_pipelines.models.build import Classifier
from vit_pipelines.models.resnet import BiTResNet
from vit_pipelines.models.surgery import for_finetuning
from vit_pipelines.training.loop import (
    TrainConfig,
    data_identity,
    gather_lists,
    process_state,
    steps_for_epochs,
    train,
)
from vit_pipelines.workers import writer_id

log = logging.getLogger(__name__)


def training_flops_per_image(model: Classifier) -> int:
    """FLOPs of one image's training step, forward and backward (matmuls, convolutions, attention), counted as
    `model` runs them; the model is left as it was."""
    was_training = model.training
    model.train()
    images = torch.zeros(1, model.config.in_chans, *model.config.image_size)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(images), torch.zeros(1, dtype=torch.long)).backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops()


def nested_subset(num_rows: int, fraction: float, seed: int) -> np.ndarray:
    """Rows of a `fraction` of `num_rows`, in order: the first rows of one seeded permutation, so every smaller
    subset lies inside every larger one and every model sees the same images."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a subset fraction must be in (0, 1], got {fraction!r}")
    order = np.random.default_rng(seed).permutation(num_rows)
    return np.sort(order[: max(1, round(fraction * num_rows))])


# a study's own keys; `models` and `subsets` (scaling) or `arms` and `subset` (ablations) name its runs
STUDY_KEYS = {
    "seeds",
    "subset_seed",
    "runs_dir",
    "train",
    "fewshot",
    "finetune",
    "models",
    "subsets",
    "arms",
    "subset",
}


def study_settings(pretrain: dict[str, Any], study: dict[str, Any]) -> dict[str, Any]:
    """A study's settings: `pretrain`'s model, training, evaluation and few-shot probe, under the study's own
    `train` and `fewshot` overrides (every arm is pretrained the way `kedro run --pipelines pretrain` would)."""
    check_known_names(study, STUDY_KEYS, "study parameters")
    return {
        **study,
        "model": pretrain["model"],
        "train": {**pretrain["train"], **(study.get("train") or {}), "eval_every": 0},
        "eval": pretrain["eval"],
        "fewshot": {**pretrain["fewshot"], **(study.get("fewshot") or {})},
    }


def arm_settings(
    study: dict[str, Any], arm: dict[str, Any], subset: dict[str, Any], rows: int
) -> dict[str, Any]:
    """The model and training parameters of one arm: the study's under the arm's overrides (an arm of another
    variant, a BiT ResNet or another ViT size, keeps only the study's image size). The steps cover
    `subset["epochs"]` over its `rows` where given (the paper trains longer on less data), else the study's; the
    warmup takes at most half of them."""
    check_known_names(arm, {"model", "train", "group", "label"}, "arm parameters")
    check_known_names(subset, {"fraction", "epochs"}, "subset parameters")
    overrides = arm.get("model") or {}
    base = study["model"]
    if overrides.get("variant", base["variant"]) != base["variant"]:  # another model: only the image size
        base = {"image_size": base["image_size"]}
    train_params = {**study["train"], **(arm.get("train") or {})}
    if subset.get("epochs") is not None:
        train_params["steps"] = steps_for_epochs(subset["epochs"], rows, train_params["batch_size"])
    train_params["warmup_steps"] = min(train_params.get("warmup_steps", 0), train_params["steps"] // 2)
    return {"model": {**base, **overrides}, "train": train_params}


def run_arm(
    train_cache: datasets.Dataset,
    minival: datasets.Dataset,
    pretrain: dict[str, Any],
    study: dict[str, Any],
    arm: dict[str, Any],
    subset: dict[str, Any],
    **downstream: datasets.Dataset,
) -> dict[str, Any]:
    """Pretrain `arm` on `subset` of `train_cache` once per seed of `study["seeds"]` and score each seed; the
    arm's settings, its pretraining compute and the mean and spread of every score over the seeds.

    `downstream` holds `<set>_train` / `<set>_test` image datasets for the few-shot probe and fine-tuning."""
    study = study_settings(pretrain, study)
    rows = nested_subset(len(train_cache), subset.get("fraction", 1.0), study.get("subset_seed", 0))
    settings = arm_settings(study, arm, subset, len(rows))
    pretrain_images = train_cache.select(rows)
    names = sorted({key.rsplit("_", 1)[0] for key in downstream})
    classes = num_classes(train_cache)
    runs, sets = [], None
    for seed in study["seeds"]:
        config = TrainConfig.from_params({**settings["train"], "seed": seed})
        model = config.build_model(settings["model"], classes)
        key = _run_key(study, settings, seed, pretrain_images, names)
        folder = Path(study["runs_dir"]) / key
        stored = folder / "result.json"
        if all(
            gather_lists([stored.exists()])
        ):  # every rank must take the same branch: scoring is collective
            log.info("%s (seed %d) finished earlier: %s", model.config.variant, seed, stored)
            runs.append(json.loads(stored.read_text()))
            continue
        result = train(
            model,
            pretrain_images,
            config,
            checkpoint_dir=folder / "checkpoints",
            description=f"{model.config.variant} on {len(rows)} images, seed {seed}",
        )
        sets = sets or transfer_sets(downstream, names, study, model.config.image_size)  # once per arm
        scores = score(result.model, minival, sets, study, folder)
        run = {
            "seed": seed,
            **scores,
            "final_train_loss": next((r["loss"] for r in reversed(result.history) if "loss" in r), None),
            "train_images_per_second": result.images_per_second,
            "wall_seconds": result.wall_seconds,
        }
        if process_state().is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = stored.with_suffix(f".tmp{writer_id()}")
            tmp.write_text(json.dumps(run, indent=1))
            tmp.replace(stored)
        runs.append(run)
        log.info(
            "%s (seed %d): %s", model.config.variant, seed, {k: v for k, v in run.items() if k != "seed"}
        )
    flops = training_flops_per_image(model)
    steps, batch = settings["train"]["steps"], settings["train"]["batch_size"]
    return {
        "group": arm.get("group"),
        "label": arm.get("label") or model.config.variant,
        "variant": model.config.variant,
        "architecture": "BiT ResNet" if isinstance(model, BiTResNet) else "ViT",
        "model_settings": settings["model"],
        "train_settings": settings["train"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "lr": settings["train"]["lr"],
        "subset_fraction": subset.get("fraction", 1.0),
        "pretrain_images": len(rows),
        "epochs": subset.get("epochs"),
        "epochs_seen": round(steps * batch / len(rows), 3),
        "steps": steps,
        "global_batch_size": batch,
        "training_flops_per_image": flops,
        "pretrain_exaflops": flops * steps * batch / 1e18,
        "downstream": names,
        "summary": summarise(runs),
        "runs": runs,
    }


def transfer_sets(
    downstream: dict[str, datasets.Dataset], names: list[str], study: dict[str, Any], size: tuple[int, int]
) -> dict[str, dict[str, tuple[datasets.Dataset, datasets.Dataset]]]:
    """Every downstream set decoded for a model of `size`: `fewshot` (pool, test) pairs and, with
    `study["finetune"]`, `finetune` (train, test) caches."""
    probe, tune = study["fewshot"], study.get("finetune")
    raw = {n: (downstream[f"{n}_train"], downstream[f"{n}_test"]) for n in names}
    sets = {
        "fewshot": cache_fewshot_sets(
            raw, pp_for_size(probe["pp_cache"], size), probe.get("max_train_per_class")
        )
    }
    if tune:
        pp_cache = pp_for_size(tune["pp_cache"], size)
        sets["finetune"] = {
            n: (cache_images(train, pp_cache)[0], cache_images(test, pp_cache)[0])
            for n, (train, test) in raw.items()
        }
    return sets


def score(
    model: Classifier,
    minival: datasets.Dataset,
    sets: dict[str, dict[str, tuple[datasets.Dataset, datasets.Dataset]]],
    study: dict[str, Any],
    folder: Path,
) -> dict[str, Any]:
    """Minival accuracy; few-shot accuracy per set and shot count on `sets["fewshot"]`; with
    `study["finetune"]`, the fine-tuned test accuracy per set of `sets["finetune"]` (the head replaced by a
    zero-initialised one, at the pretraining resolution)."""
    evaluation, probe, tune = study["eval"], study["fewshot"], study.get("finetune")
    out: dict[str, Any] = {
        "minival_accuracy": evaluate_accuracy(model, minival, evaluation["pp"], evaluation["batch_size"])
    }
    accuracies = fewshot_accuracies(
        model, sets["fewshot"], probe["pp"], probe["shots"], probe["seeds"], probe["l2_reg"]
    )
    out["fewshot"] = {k.removesuffix("_accuracy"): v for k, v in accuracies.items()}
    if tune:
        out["finetune"] = {}
        size = model.config.image_size
        config = TrainConfig.from_params(tune["train"])
        config = dataclasses.replace(config, pp_train=pp_for_size(config.pp_train, size))
        for name, (train_cache, test_cache) in sets["finetune"].items():
            start = for_finetuning(model, size, num_classes(train_cache))
            _, scores = finetune_and_test(
                start,
                train_cache,
                test_cache,
                config,
                pp_for_size(tune["eval"]["pp"], size),
                tune["eval"]["batch_size"],
                folder / "finetune" / name,
            )
            ema = scores["test_accuracy_ema"]
            out["finetune"][name] = ema if ema is not None else scores["test_accuracy"]
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, standard deviation and per-seed values of minival accuracy, of each few-shot and fine-tuning score,
    and of their averages over the downstream sets (the paper's "average 5-shot" of Fig. 4)."""
    columns: dict[str, list[float]] = {"minival_accuracy": [r["minival_accuracy"] for r in runs]}
    for kind in ("fewshot", "finetune"):
        if kind not in runs[0]:
            continue
        for name in runs[0][kind]:
            columns[f"{kind}/{name}"] = [r[kind][name] for r in runs]
        if kind == "finetune":
            columns["finetune/mean"] = [statistics.fmean(r[kind].values()) for r in runs]
    for shots in sorted({k.rsplit("_", 1)[1] for k in runs[0]["fewshot"]}, key=lambda s: int(s[:-4])):
        columns[f"fewshot/mean_{shots}"] = [
            statistics.fmean(v for k, v in r["fewshot"].items() if k.endswith(f"_{shots}")) for r in runs
        ]
    return {
        name: {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values,
        }
        for name, values in columns.items()
    }


def _run_key(
    study: dict[str, Any],
    settings: dict[str, Any],
    seed: int,
    images: datasets.Dataset,
    names: list[str],
) -> str:
    """Everything that decides one seed's result: model, training, the images, the scoring settings."""
    scoring = {k: study.get(k) for k in ("eval", "fewshot", "finetune")}
    rows = (
        hashlib.sha1(images._indices.column(0).to_numpy().tobytes()).hexdigest()
        if images._indices is not None
        else None
    )
    blob = json.dumps(
        [settings, seed, data_identity(images), rows, names, scoring],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def study_table(results: dict[str, dict[str, Any]], key_names: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per run of a study: its key's parts (`<model>__<subset>` → model, subset) and its result."""
    rows = []
    for key, result in results.items():
        parts = key.split("__")
        if len(parts) != len(key_names):
            raise ValueError(f"study result {key!r} must be named {'__'.join(f'<{k}>' for k in key_names)}")
        rows.append({**dict(zip(key_names, parts, strict=True)), **result})
    return rows


def largest_shots(rows: list[dict[str, Any]]) -> str:
    """The summary key of the mean few-shot accuracy with the most shots, e.g. `fewshot/mean_10shot`."""
    keys = [k for k in rows[0]["summary"] if k.startswith("fewshot/mean_")]
    return max(keys, key=lambda k: int(k.removeprefix("fewshot/mean_").removesuffix("shot")))


def check_study(pretrain: dict[str, Any], study: dict[str, Any], name: str) -> None:
    """Build every arm's model config and training settings of the study `name` (on a nominal subset size), so
    a bad setting is one line before any work, naming the arm."""
    settings = study_settings(pretrain, study)
    seeds = study.get("seeds")
    if not seeds or not all(isinstance(seed, int) for seed in seeds):
        raise ValueError(f"{name}.seeds must be a non-empty list of whole numbers, got {seeds!r}")
    subsets = study.get("subsets") or {"subset": study.get("subset") or {}}
    arms = study.get("models") or study.get("arms") or {}
    for arm_name, arm in arms.items():
        for subset_name, subset in subsets.items():
            try:
                values = arm_settings(settings, arm, subset, rows=1000)
                config = TrainConfig.from_params(values["train"])
                with torch.device("meta"):  # the config is checked, no memory is spent
                    config.build_model(values["model"], classes=2)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name} arm {arm_name!r} ({subset_name}): {err}") from err
