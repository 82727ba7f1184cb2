"""Figures people look at rather than read: training curves, study results."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def plot_curves(records: list[dict[str, float]], title: str, chance: float | None = None) -> Figure:
    """Loss and accuracy against steps: training (running mean between logs), every evaluation and, when the
    run probed it, few-shot accuracy per downstream set (as the paper's Fig. 4); `chance` (1 / classes) as a
    dotted line under the accuracies."""
    train_logs = [r for r in records if "loss" in r]
    evals = sorted({k for r in records for k in r if k.endswith("accuracy") and k != "accuracy"})
    fewshot = [k for k in evals if k.startswith("fewshot_")]
    panels = 3 if fewshot else 2
    fig = Figure(figsize=(5 * panels, 3.8))
    axes = fig.subplots(1, panels)
    ax_loss, ax_acc = axes[0], axes[1]
    ax_loss.plot([r["step"] for r in train_logs], [r["loss"] for r in train_logs], label="train")
    for term in sorted({k for r in train_logs for k in r if k.endswith("_loss")}):  # DRLoc's terms
        points = [r for r in train_logs if term in r]
        ax_loss.plot(
            [r["step"] for r in points], [r[term] for r in points], "--", label=term.replace("_", " ")
        )
    ax_acc.plot([r["step"] for r in train_logs], [r["accuracy"] for r in train_logs], label="train (running)")
    for key in evals:
        ax = axes[2] if key in fewshot else ax_acc
        points = [r for r in records if key in r]
        label = key.removeprefix("fewshot_").removesuffix("_accuracy").replace("_", " ")
        ax.plot([r["step"] for r in points], [r[key] for r in points], "o-", label=label)
    if chance is not None:
        ax_acc.axhline(chance, color="grey", lw=0.8, ls=":", label=f"chance {chance:.3f}")
    ax_loss.set(xlabel="step", ylabel="loss", title=title)
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    if fewshot:
        axes[2].set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="few-shot linear probe (set, shots)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_fewshot(per_dataset: dict[str, dict]) -> Figure:
    """Accuracy against shots per class, one panel per dataset: each model's mean over seeds with its 95% CI
    as error bars (said in the title)."""
    fig = Figure(figsize=(4.2 * len(per_dataset), 3.6))
    axes = fig.subplots(1, len(per_dataset), squeeze=False)
    for ax, (name, result) in zip(axes[0], per_dataset.items(), strict=True):
        for kind, style in (("pretrained", "o-"), ("random_init", "s--")):
            shots = [int(k) for k in result[kind]]
            means = [v["mean"] for v in result[kind].values()]
            errors = [v["ci95"] for v in result[kind].values()]
            label = "pretrained ViT" if kind == "pretrained" else "same ViT, random init"
            ax.errorbar(shots, means, yerr=errors, fmt=style, capsize=3, label=label)
        ax.axhline(1.0 / result["num_classes"], color="grey", lw=0.8, ls=":", label="chance")
        title = f"{name} ({result['num_classes']} classes, {result['test_images']} test images)"
        ax.set(xscale="log", xlabel="shots per class", ylabel="test accuracy", ylim=(0, 1), title=title)
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = len(next(iter(next(iter(per_dataset.values()))["pretrained"].values()))["per_seed"])
    fig.suptitle(
        f"Linear few-shot accuracy (ridge on frozen features): mean of {seeds} seeds of the few training "
        "images; bars: 95% confidence interval over seeds",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_drloc_comparison(runs: list[dict]) -> Figure:
    """Held-out accuracy per seed without and with DRLoc (a line joins the runs of one seed), and each run's
    classification loss against steps."""
    fig = Figure(figsize=(10, 3.8))
    ax_acc, ax_loss = fig.subplots(1, 2)
    seeds = sorted({r["seed"] for r in runs})
    for seed in seeds:
        pair = sorted((r for r in runs if r["seed"] == seed), key=lambda r: r["drloc"])
        ax_acc.plot(
            [int(r["drloc"]) for r in pair], [r["minival_accuracy"] for r in pair], "o-", label=f"seed {seed}"
        )
    for arm in (False, True):
        values = [r["minival_accuracy"] for r in runs if r["drloc"] == arm]
        ax_acc.hlines(sum(values) / len(values), int(arm) - 0.15, int(arm) + 0.15, colors="black", lw=2)
    ax_acc.set_xticks([0, 1], ["without DRLoc", "with DRLoc"])
    ax_acc.set(xlim=(-0.5, 1.5), ylabel="minival accuracy", title="held-out accuracy (bar: mean)")
    for run in runs:
        curve = run["curve"]
        key = "classification_loss" if run["drloc"] else "loss"
        ax_loss.plot(
            [p["step"] for p in curve],
            [p[key] for p in curve],
            "-" if run["drloc"] else ":",
            label=f"{'with' if run['drloc'] else 'without'}, seed {run['seed']}",
        )
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="training classification loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def metric_label(metric: str) -> str:
    """A study summary's metric as people say it: `minival_accuracy` → minival, `finetune/mean` → fine-tuning,
    `fewshot/mean_10shot` → 10-shot."""
    if metric == "minival_accuracy":
        return "minival"
    if metric == "finetune/mean":
        return "fine-tuning"
    return metric.removeprefix("fewshot/mean_").removesuffix("shot") + "-shot"


def plot_scaling(rows: list[dict], shots: str) -> Figure:
    """The paper's Fig. 3-5 for a `scaling` study: minival, fine-tuning and linear few-shot accuracy (the last
    two a mean over the downstream sets) against pretraining images, and the same few-shot accuracy against
    pretraining exaFLOPs; one line per model, error bars one standard deviation over seeds.

    Each row needs `model`, `pretrain_images`, `pretrain_exaflops` and `summary` ({metric: {mean, std}});
    `shots` names the few-shot metric (`fewshot/mean_10shot`)."""
    panels = [
        ("minival_accuracy", "pretrain_images", "held-out pretraining accuracy"),
        ("finetune/mean", "pretrain_images", "fine-tuning accuracy (Fig. 3)"),
        (shots, "pretrain_images", f"linear {metric_label(shots)} accuracy (Fig. 4)"),
        (shots, "pretrain_exaflops", f"{metric_label(shots)} accuracy against compute (Fig. 5)"),
    ]
    panels = [p for p in panels if p[0] in rows[0]["summary"]]
    fig = Figure(figsize=(4.6 * len(panels), 4))
    for ax, (metric, x, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for model in dict.fromkeys(r["model"] for r in rows):
            line = sorted((r for r in rows if r["model"] == model), key=lambda r: r[x])
            ax.errorbar(
                [r[x] for r in line],
                [r["summary"][metric]["mean"] for r in line],
                yerr=[r["summary"][metric]["std"] for r in line],
                marker="o",
                capsize=3,
                label=f"{model} ({line[0]['variant']})",
            )
        ax.set_xscale("log")
        ax.tick_params(axis="x", which="minor", labelbottom=False)  # labelled minor ticks overlap
        xlabel = "pretraining images" if x == "pretrain_images" else "pretraining compute (exaFLOPs)"
        ylabel = "accuracy" if metric == "minival_accuracy" else "accuracy, mean over downstream sets"
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_ablations(rows: list[dict], shots: str) -> Figure:
    """One panel per ablation group (position embedding: Table 8; head and learning rate: Fig. 9): per arm, the
    minival and the linear few-shot accuracy as bars (mean over seeds), every seed as a dot.

    Each row needs `group`, `label`, `summary` ({metric: {mean, std, values}}); `shots` names the
    few-shot metric (`fewshot/mean_10shot`)."""
    metrics = [("minival_accuracy", "minival"), (shots, f"{metric_label(shots)}, mean over sets")]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    fig = Figure(
        figsize=(1.6 * max(len([r for r in rows if r["group"] == g]) for g in groups) * len(groups) + 2, 4)
    )
    for ax, group in zip(fig.subplots(1, len(groups), squeeze=False)[0], groups, strict=True):
        arms = [r for r in rows if r["group"] == group]
        for j, (metric, name) in enumerate(metrics):
            at = np.arange(len(arms)) + (j - 0.5) * 0.38
            ax.bar(at, [a["summary"][metric]["mean"] for a in arms], width=0.36, label=name, alpha=0.8)
            for x, arm in zip(at, arms, strict=True):
                values = arm["summary"][metric]["values"]
                ax.plot([x] * len(values), values, "k.", ms=4)
        ax.set_xticks(range(len(arms)), [a["label"] for a in arms], rotation=15, fontsize=8)
        ax.set(ylabel="accuracy", title=f"{group} (dots: seeds)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
