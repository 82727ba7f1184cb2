"""Few-shot evaluation as the paper runs it (§4.1): seeded k-shot subsets per class, the closed-form ridge
(`ridge.py`) on frozen features, mean and 95% interval over seeds; the probe run during pretraining.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import scipy.stats

from vit_pipelines.data.cache import cache_images, label_array
from vit_pipelines.evaluation.features import extract_features
from vit_pipelines.evaluation.ridge import DEFAULT_L2_REG, fewshot_ridge, select_l2_reg
from vit_pipelines.models.vit import VisionTransformer


def sample_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """big_vision's few-shot subset: per class, a seeded shuffle of its indices, first `shots` taken."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(f"class {c} has {len(members)} training examples, fewer than {shots} shots")
        picked.append(rng.permutation(members)[:shots])
    return np.sort(np.concatenate(picked))


def check_fewshot_params(params: dict[str, Any], where: str) -> None:
    """The probe's settings in range: shots and seeds whole numbers >= 1, λ > 0, a pool of >= max(shots)."""

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    shots = params.get("shots", [])
    if not isinstance(shots, list) or not shots or not all(whole(k) for k in shots):
        raise ValueError(f"{where}.shots must be a list of whole numbers >= 1, got {shots!r}")
    if not whole(params.get("seeds", 1)):
        raise ValueError(f"{where}.seeds must be a whole number >= 1, got {params.get('seeds')!r}")
    grid = params.get("l2_grid") or [params.get("l2_reg", 1.0)]
    if not all(isinstance(lam, int | float) and not isinstance(lam, bool) and lam > 0 for lam in grid):
        raise ValueError(f"{where}: l2_reg and l2_grid values must be > 0, got {grid!r}")
    pool = params.get("max_train_per_class")
    if pool is not None and (not whole(pool) or pool < max(shots)):
        raise ValueError(
            f"{where}.max_train_per_class must be null or >= the most shots ({max(shots)}), got {pool!r}"
        )


def fewshot_pool(labels: np.ndarray, per_class: int | None, seed: int = 0) -> np.ndarray:
    """The train rows few-shot subsets are drawn from, ascending: per class the first `per_class` of a seeded
    shuffle (big_vision draws from a fixed `train[:N]`), or every row where None. Only these need features:
    at most `per_class` x classes forward passes, however large the train split."""
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    return np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)])
    )


def mean_and_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0
    sem = values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(scipy.stats.t.ppf(0.975, len(values) - 1) * sem)


def fewshot_grid(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: int = 3,
    l2_reg: float = DEFAULT_L2_REG,
    l2_grid: Sequence[float] | None = None,
) -> dict[str, dict]:
    """Accuracy for every shot count over `seeds` seeded subsets: `{str(shots): {"mean", "ci95", "per_seed",
    "l2_reg"}}`. With `l2_grid`, each subset picks its λ by leave-one-out on itself instead of `l2_reg`."""
    (x_train, y_train), (x_test, y_test) = train, test
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    results = {}
    for k in shots:
        per_seed, chosen = [], []
        for seed in range(seeds):
            idx = sample_shots(y_train, k, seed)
            lam = select_l2_reg(x_train[idx], y_train[idx], l2_grid, num_classes) if l2_grid else l2_reg
            chosen.append(lam)
            per_seed.append(fewshot_ridge(x_train[idx], y_train[idx], x_test, y_test, lam, num_classes))
        mean, ci = mean_and_ci95(per_seed)
        results[str(k)] = {"mean": mean, "ci95": ci, "per_seed": per_seed, "l2_reg": chosen}
    return results


def pp_for_size(template: str, size: tuple[int, int]) -> str:
    """Fill a pp template's `{size}` with a model's resolution: `32` for square images, else `(h, w)`."""
    return template.format(size=size[0] if size[0] == size[1] else tuple(size))


def cache_fewshot_sets(
    raw: dict[str, tuple[datasets.Dataset, datasets.Dataset]], pp_cache: str, per_class: int | None = None
) -> dict[str, tuple[datasets.Dataset, datasets.Dataset]]:
    """Decode and resize each downstream (train pool, test) pair once; the pool is `fewshot_pool`'s."""
    return {
        name: (
            cache_images(train.select(fewshot_pool(label_array(train), per_class)), pp_cache)[0],
            cache_images(test, pp_cache)[0],
        )
        for name, (train, test) in raw.items()
    }


@dataclass
class FewshotProbe:
    """The few-shot probe as a training-loop evaluator: `(model, accelerator)` → `fewshot_accuracies`."""

    sets: dict[str, tuple[datasets.Dataset, datasets.Dataset]]
    pp: str
    shots: Sequence[int]
    seeds: int = 1
    l2_reg: float = DEFAULT_L2_REG

    def __call__(self, model: VisionTransformer, accelerator: Any) -> dict[str, float]:
        net = accelerator.unwrap_model(model)
        return fewshot_accuracies(net, self.sets, self.pp, self.shots, self.seeds, self.l2_reg)


def fewshot_accuracies(
    model: VisionTransformer,
    sets: dict[str, tuple[datasets.Dataset, datasets.Dataset]],
    pp: str,
    shots: Sequence[int],
    seeds: int = 1,
    l2_reg: float = DEFAULT_L2_REG,
) -> dict[str, float]:
    """`{"<set>_<k>shot_accuracy": mean over seeds}`: the quick probe run during pretraining (paper Fig. 4)."""
    out = {}
    for name, (train_cache, test_cache) in sets.items():
        train = extract_features(model, train_cache, pp, desc=f"{name} train")
        test = extract_features(model, test_cache, pp, desc=f"{name} test")
        for k, result in fewshot_grid(train, test, shots, seeds, l2_reg).items():
            out[f"{name}_{k}shot_accuracy"] = result["mean"]
    return out
