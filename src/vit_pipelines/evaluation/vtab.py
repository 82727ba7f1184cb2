"""VTAB-1k (paper App. B.1.1, Table 9; VTAB arXiv 1910.04867): low-data transfer, 1,000 training examples a task.

Per task: train800 and val200 are drawn deterministically from the source's train (and validation, if it has one)
split; every setting of a small grid fine-tunes on train800 and is scored on val200; ONE setting is chosen by the
mean val200 accuracy over all tasks (as the paper did); it fine-tunes again on train800val200 and is tested on the
full test split. BiT's augmentation exceptions (no flip, no random crop) come with each task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from matplotlib.figure import Figure

from vit_pipelines.data.cache import num_classes
from vit_pipelines.data.sources import load_image_dataset
from vit_pipelines.fields import check_known_fields

GROUPS = ("natural", "specialized", "structured")


@dataclass(frozen=True)
class Task:
    """One entry of the registry (`vtab.tasks` in conf/base/parameters_vtab.yml)."""

    name: str
    group: str
    source: str  # a `load_image_dataset` source: "hub:clip-benchmark/wds_vtab-cifar100", "embedded:digits", …
    train_split: str = "train"
    val_split: str | None = None  # None: val200 comes from the train split, disjoint from train800
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    num_classes: int | None = None  # checked against the data when given
    flip: bool = True  # BiT: no horizontal flip for dSprites-orientation, sNORB-azimuth, dSprites-location
    crop: bool = True  # BiT: no random crop for Clevr-count/-distance, DMLab, KITTI, dSprites-location

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> Task:
        check_known_fields(cls, {**params, "name": name}, f"keys of VTAB task {name!r}")
        task = cls(name=name, **params)
        if task.group not in GROUPS:
            raise ValueError(f"task {name!r}: group must be one of {GROUPS}, got {task.group!r}")
        return task


def vtab_splits(
    train: datasets.Dataset,
    validation: datasets.Dataset | None,
    seed: int,
    train_size: int = 800,
    val_size: int = 200,
) -> dict[str, datasets.Dataset]:
    """`{"train800", "val200", "train800val200"}` (named for the default sizes): a seeded permutation of the
    train split gives train800; val200 is the first `val_size` of a permuted validation split, or, without one,
    the next `val_size` of the train permutation. The same inputs and seed always give the same rows."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    needed = train_size + (0 if validation is not None else val_size)
    if len(train) < needed:
        raise ValueError(f"the train split has {len(train)} examples; VTAB-1k needs {needed}")
    train800 = train.select(np.sort(order[:train_size]))
    if validation is None:
        val200 = train.select(np.sort(order[train_size : train_size + val_size]))
    else:
        if len(validation) < val_size:
            raise ValueError(f"the validation split has {len(validation)} examples; VTAB-1k needs {val_size}")
        val200 = validation.select(np.sort(rng.permutation(len(validation))[:val_size]))
    return {
        "train800": train800,
        "val200": val200,
        "train800val200": datasets.concatenate_datasets([train800, val200]),
    }


def load_task_splits(
    task: Task, seed: int, train_size: int = 800, val_size: int = 200, test_limit: int | None = None
) -> dict[str, datasets.Dataset]:
    """train800 / val200 / train800val200 (`vtab_splits`) and test of `task`, read from its source, not yet
    decoded; at most `test_limit` test examples where given."""

    def load(split: str | None, limit: int | None = None) -> datasets.Dataset | None:
        if split is None:
            return None
        columns = {"image_column": task.image_column, "label_column": task.label_column}
        return load_image_dataset(task.source, split, limit=limit, **columns)

    raw = vtab_splits(load(task.train_split), load(task.val_split), seed, train_size, val_size)
    return {**raw, "test": load(task.test_split, test_limit)}


def task_classes(task: Task, *labelled: datasets.Dataset) -> int:
    """The task's number of classes: the registry's, checked against the labels, else the labels'."""
    found = max(num_classes(ds) for ds in labelled)
    if task.num_classes is not None and found > task.num_classes:
        raise ValueError(f"labels reach {found - 1} but the registry says {task.num_classes} classes")
    return task.num_classes or found


def train_pp(task: Task, size: int, crop_op: str, no_crop_op: str, flip_op: str) -> str:
    """The training pp of `task` from the cached images: a random crop (or, for tasks where position is the
    label, a central crop), a flip unless the task forbids it, then values in [-1, 1]."""
    ops = [(crop_op if task.crop else no_crop_op).format(size=size)]
    if task.flip:
        ops.append(flip_op)
    return "|".join([*ops, "value_range(-1,1)"])


def setting_name(setting: Mapping[str, Any]) -> str:
    """`{"lr": 0.01, "steps": 40}` → "lr=0.01,steps=40": the key of a setting in the results."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(setting.items()))


def mean_val_scores(
    val_scores: Mapping[str, Mapping[str, float]], settings: Sequence[str]
) -> dict[str, float]:
    """Per setting, the mean val200 accuracy over the tasks that scored every setting."""
    complete = [scores for scores in val_scores.values() if all(s in scores for s in settings)]
    if not complete:
        raise ValueError("no task finished its hyper-parameter sweep: nothing to choose a setting from")
    return {s: float(np.mean([scores[s] for scores in complete])) for s in settings}


def select_setting(val_scores: Mapping[str, Mapping[str, float]], settings: Sequence[str]) -> str:
    """The setting with the best MEAN val200 accuracy over all tasks that scored every setting (the paper picks
    one setting for the whole benchmark, not one per task); a tie goes to the earlier setting of the grid."""
    means = mean_val_scores(val_scores, settings)
    return settings[int(np.argmax([means[s] for s in settings]))]


def summarise(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per group and overall: the mean test accuracy over the tasks that finished (failed ones are listed)."""
    done = {name: r for name, r in results.items() if r.get("test_accuracy") is not None}
    groups = {
        group: float(np.mean([r["test_accuracy"] for r in done.values() if r["group"] == group]))
        for group in GROUPS
        if any(r["group"] == group for r in done.values())
    }
    return {
        "group_mean": groups,
        "mean": float(np.mean([r["test_accuracy"] for r in done.values()])) if done else None,
        "finished": sorted(done),
        "failed": {name: r["error"] for name, r in results.items() if r.get("error")},
    }


def plot_vtab(
    results: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any], suite: str = "VTAB-1k"
) -> Figure:
    """One panel per group, as the paper's Fig. 2: test accuracy per task (its value at the bar's foot), the
    group mean as a dashed line, labelled in the room above 1.0; `suite` names the tasks in the title."""
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, len(GROUPS), squeeze=False)
    colours = dict(zip(GROUPS, ("tab:green", "tab:purple", "tab:orange"), strict=True))
    for ax, group in zip(axes[0], GROUPS, strict=True):
        names = [n for n, r in results.items() if r["group"] == group]
        values = [results[n].get("test_accuracy") or 0.0 for n in names]
        bars = ax.bar(names, values, color=colours[group], label="test accuracy")
        for bar, name in zip(bars, names, strict=True):
            label = "failed" if results[name].get("error") else f"{results[name]['test_accuracy']:.2f}"
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, 0.02),
                ha="center",
                va="bottom",
                fontsize=8,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
            )
        if group in summary["group_mean"]:
            mean = summary["group_mean"][group]
            ax.axhline(mean, color="black", ls="--", lw=1, label=f"group mean {mean:.3f}")
        ax.legend(fontsize=8, loc="upper center", ncols=2, frameon=False)
        ax.set(
            title=f"{group} ({len(names)} task{'' if len(names) == 1 else 's'})",
            ylim=(0, 1.14),
            ylabel="test accuracy",
        )
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    mean = summary["mean"]
    outcome = f"mean test accuracy {mean:.3f}" if mean is not None else "no task finished"
    sizes = sorted({r["train_images"] for r in results.values() if r.get("train_images")})
    per_task = f"{'/'.join(map(str, sizes))} training images per task, " if sizes else ""
    fig.suptitle(f"{suite}: {outcome} ({per_task}full test splits)")
    fig.tight_layout()
    return fig
