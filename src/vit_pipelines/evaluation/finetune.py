"""Fine-tuning transfer (paper §3.2, Table 4, App. B.1.1): every learning rate of a grid fine-tunes on train
minus a dev split and is scored on dev; the best one fine-tunes again on all of train; then test accuracy of the
raw and of the Polyak-averaged (EMA) weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vit_pipelines.data.loader import content_fingerprint
from vit_pipelines.evaluation.classification import evaluate_accuracy
from vit_pipelines.evaluation.features import weights_fingerprint
from vit_pipelines.evaluation.plots import plot_curves
from vit_pipelines.models.vit import VisionTransformer
from vit_pipelines.training.loop import Evaluator, TrainConfig, TrainResult, make_accelerator, train


def best_lr(dev_accuracy: Mapping[float, float]) -> float:
    """The learning rate with the highest dev accuracy; a tie goes to the smaller one (the gentler change)."""
    if not dev_accuracy:
        raise ValueError("no learning rate was evaluated")
    return min(dev_accuracy, key=lambda lr: (-dev_accuracy[lr], lr))


def finetune(
    model: VisionTransformer,
    train_cache: datasets.Dataset,
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    evaluators: dict[str, Evaluator] | None = None,
    description: str = "finetune",
) -> TrainResult:
    """`train` a copy of `model`, with checkpoints under `checkpoint_dir/<start weights>-<data>/`: the loop's own
    key covers only the settings and the data size, and runs from other weights or data must not resume these."""
    run_root = None
    if checkpoint_dir is not None:
        key = f"{weights_fingerprint(model)[:8]}-{content_fingerprint(train_cache)[:8]}"
        run_root = Path(checkpoint_dir) / key
    return train(
        copy.deepcopy(model),
        train_cache,
        config,
        checkpoint_dir=run_root,
        evaluators=evaluators,
        description=description,
    )


def accuracy_as_trained(
    model: VisionTransformer, cache: datasets.Dataset, pp: str, batch_size: int, precision: str
) -> float:
    """`evaluate_accuracy` on the training device with the training precision (bf16 autocast where used)."""
    accelerator = make_accelerator(precision)
    return evaluate_accuracy(model.to(accelerator.device), cache, pp, batch_size, accelerator)


def dev_accuracies(
    model: VisionTransformer,
    train_cache: datasets.Dataset,
    dev_cache: datasets.Dataset,
    configs: Sequence[TrainConfig],
    pp_eval: str,
    eval_batch: int,
    checkpoint_dir: str | Path | None = None,
) -> dict[float, float]:
    """Dev accuracy of `model` fine-tuned on `train_cache` with each of `configs`, keyed by its learning rate."""
    results = {}
    for config in configs:
        run = finetune(model, train_cache, config, checkpoint_dir, description=f"dev lr={config.lr:g}")
        results[config.lr] = accuracy_as_trained(
            run.model, dev_cache, pp_eval, eval_batch, config.mixed_precision
        )
    return results


def finetune_and_test(
    model: VisionTransformer,
    train_cache: datasets.Dataset,
    test_cache: datasets.Dataset,
    config: TrainConfig,
    pp_eval: str,
    eval_batch: int,
    checkpoint_dir: str | Path | None = None,
) -> tuple[TrainResult, dict[str, float | None]]:
    """Fine-tune on all of `train_cache`; the run (its history has test accuracy every `eval_every` steps, for
    the curves) and the final test accuracy of the raw and, with `config.ema_decay`, the EMA weights."""

    def test_accuracy(net: VisionTransformer, accelerator: Any) -> dict[str, float]:
        return {"test_accuracy": evaluate_accuracy(net, test_cache, pp_eval, eval_batch, accelerator)}

    run = finetune(model, train_cache, config, checkpoint_dir, {"test_accuracy": test_accuracy}, "final")
    scores = {
        "test_accuracy": accuracy_as_trained(
            run.model, test_cache, pp_eval, eval_batch, config.mixed_precision
        ),
        "test_accuracy_ema": None,
    }
    if run.ema_model is not None:
        scores["test_accuracy_ema"] = accuracy_as_trained(
            run.ema_model, test_cache, pp_eval, eval_batch, config.mixed_precision
        )
    return run, scores


def plot_finetune(per_dataset: Mapping[str, Mapping[str, Any]]) -> Figure:
    """One row per dataset: the final run's curves (`plot_curves`: loss, train and test accuracy, chance) and
    the dev accuracy of every learning rate of the grid as bars (the chosen one in orange), the final test
    accuracies as lines, every mark in the legend.

    Each result needs `history`, `dev_accuracy` ({lr: accuracy}), `chosen_lr`, `test_accuracy` and
    `test_accuracy_ema` (None without EMA); an optional `from_scratch` result is drawn as a red dotted line."""
    fig = Figure(figsize=(14, 3.9 * len(per_dataset)))
    axes = fig.subplots(len(per_dataset), 2, width_ratios=[10, 4], squeeze=False)
    for (curves_ax, bars_ax), (name, result) in zip(axes, per_dataset.items(), strict=True):
        title = f"{name}: fine-tuning at lr {result['chosen_lr']:g}"
        curves = plot_curves(result["history"], title, chance=1.0 / result["num_classes"])
        # drawn once as an image, so the curves stay exactly plot_curves' figure
        canvas = FigureCanvasAgg(curves)
        canvas.draw()
        curves_ax.imshow(np.asarray(canvas.buffer_rgba()))
        curves_ax.set_axis_off()
        lrs = sorted(result["dev_accuracy"])
        for chosen, colour, label in (
            (False, "tab:blue", "dev accuracy"),
            (True, "tab:orange", "dev, chosen LR"),
        ):
            at = [i for i, lr in enumerate(lrs) if (lr == result["chosen_lr"]) == chosen]
            values = [result["dev_accuracy"][lrs[i]] for i in at]
            bars_ax.bar(at, values, color=colour, label=label if at else None)
        bars_ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        for key, style in (("test_accuracy", "-"), ("test_accuracy_ema", "--")):
            if result[key] is not None:
                label = f"test {'EMA' if key.endswith('ema') else 'raw'} {result[key]:.3f}"
                bars_ax.axhline(result[key], color="black", lw=1, ls=style, label=label)
        scratch = result.get("from_scratch")
        if scratch is not None:
            key = "test_accuracy" if scratch["test_accuracy_ema"] is None else "test_accuracy_ema"
            label = f"from scratch, test {scratch[key]:.3f}"
            bars_ax.axhline(scratch[key], color="tab:red", lw=1, ls=":", label=label)
        bars_ax.set(
            xlabel="learning rate",
            ylabel="accuracy",
            ylim=(0, 1.5),
            title=f"{name}: LR grid on dev, then test",
        )
        bars_ax.set_yticks(np.linspace(0, 1, 6))
        bars_ax.grid(alpha=0.3, axis="y")
        bars_ax.legend(fontsize=7, loc="upper center", ncols=2, frameon=False)  # in the room above 1.0
    fig.tight_layout()
    return fig
