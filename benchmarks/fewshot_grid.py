"""The few-shot grid's cost: this project's closed-form ridge against scikit-learn's Ridge, in one process.

Workload (issue 5): 1,000 classes, 768-d features, shots (1, 5, 10, 25) x 3 seeds x 8 values of λ, a
10,000-image test set. Ours fits one eigendecomposition per (shots, seed) and reuses it for all 8 λ;
the reference fits `sklearn.linear_model.Ridge` once per λ on the same standardised features with the same
bias column (so both give the same accuracies, which the script checks). The reference runs on the seed-0
subsets only and is scaled by the number of seeds, to keep the benchmark short; the JSON says so. The two
are timed alternately, shot count by shot count, so that the machine's load changes hit both.

    python benchmarks/fewshot_grid.py

Prints a table and writes `benchmarks/results/fewshot_grid.json` (`benchmarks/run.py` runs everything).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from report import machine, print_table, write_json
from sklearn.linear_model import Ridge

from vit_pipelines.evaluation.fewshot import sample_shots
from vit_pipelines.evaluation.ridge import BIAS_CONSTANT, fewshot_ridge


def features(classes: int, dim: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng([classes, dim]).normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    noise = np.random.default_rng(seed).normal(scale=2.0, size=(len(labels), dim))
    return (centres[labels] + noise).astype(np.float32), labels


def sklearn_grid(x_train, y_train, x_test, y_test, grid, classes) -> dict[float, float]:
    mean, std = x_train.astype(np.float64).mean(0), x_train.astype(np.float64).std(0) + 1e-5
    prep = lambda x: np.hstack([(x - mean) / std, np.full((len(x), 1), BIAS_CONSTANT)])  # noqa: E731
    targets = 2.0 * np.eye(classes)[y_train] - 1.0
    a, b = prep(x_train), prep(x_test)
    return {
        lam: float(
            (Ridge(alpha=lam, fit_intercept=False).fit(a, targets).predict(b).argmax(1) == y_test).mean()
        )
        for lam in grid
    }


def run(classes: int = 1000, dim: int = 768, test_per_class: int = 10, seeds: int = 3) -> dict[str, Any]:
    shots, grid = (1, 5, 10, 25), [2.0**p for p in range(-2, 14, 2)]  # 8 values of λ, 1024 among them
    x_pool, y_pool = features(classes, dim, 25, seed=1)
    x_test, y_test = features(classes, dim, test_per_class, seed=2)

    ours, reference, ours_seconds, sklearn_seconds = {}, {}, 0.0, 0.0
    for k in shots:  # interleaved per shot count, so a change in the machine's load hits both sides
        start = time.perf_counter()
        for s in range(seeds):
            ours[(k, s)] = fewshot_ridge(*subset(x_pool, y_pool, k, s), x_test, y_test, grid)
        ours_seconds += time.perf_counter() - start
        start = time.perf_counter()
        reference[k] = sklearn_grid(*subset(x_pool, y_pool, k, 0), x_test, y_test, grid, classes)
        sklearn_seconds += (time.perf_counter() - start) * seeds
        for lam in grid:  # same maths: same accuracies
            assert abs(ours[(k, 0)][lam] - reference[k][lam]) < 1e-3, (
                k,
                lam,
                ours[(k, 0)][lam],
                reference[k][lam],
            )
    return {
        "benchmark": "fewshot_grid", "machine": machine(), "classes": classes, "dim": dim, "shots": shots,
        "seeds": seeds, "l2_grid": grid, "test_images": len(y_test),
        "seconds": {"vit_pipelines": ours_seconds, "sklearn_ridge_per_lambda": sklearn_seconds},
        "sklearn_note": f"seed 0 timed and multiplied by {seeds}",
        "speedup": sklearn_seconds / ours_seconds, "goal_speedup": 10.0,
        "accuracy_at_1024": {k: ours[(k, 0)][1024.0] for k in shots},
    }  # fmt: skip


def report(result: dict[str, Any]) -> list[list[Any]]:
    seconds = result["seconds"]
    rows = [
        ["vit_pipelines (one eigh per fit)", seconds["vit_pipelines"]],
        [f"sklearn Ridge per λ ({result['sklearn_note']})", seconds["sklearn_ridge_per_lambda"]],
        ["speed-up (goal >= 10x)", result["speedup"]],
    ]
    print_table(
        f"few-shot grid: {result['classes']} classes, {result['dim']}-d, shots {result['shots']} x "
        f"{result['seeds']} seeds x {len(result['l2_grid'])} λ",
        ["solver", "seconds"],
        rows,
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/fewshot_grid.json")
    args = parser.parse_args()
    result = run(args.classes, args.dim, args.test_per_class, args.seeds)
    report(result)
    write_json(args.out, result)


def subset(x: np.ndarray, y: np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = sample_shots(y, shots, seed)
    return x[idx], y[idx]


if __name__ == "__main__":
    main()
