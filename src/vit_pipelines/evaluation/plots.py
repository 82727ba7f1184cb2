"""Figures people look at rather than read: training curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never open a window
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(records: list[dict[str, float]], title: str) -> plt.Figure:
    """Loss and accuracy against steps: training (running mean between logs) and every evaluation."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    train_logs = [r for r in records if "loss" in r]
    evals = {k for r in records for k in r if k.endswith("accuracy") and k != "accuracy"}
    ax_loss.plot([r["step"] for r in train_logs], [r["loss"] for r in train_logs], label="train")
    ax_acc.plot([r["step"] for r in train_logs], [r["accuracy"] for r in train_logs], label="train (running)")
    for key in sorted(evals):
        points = [r for r in records if key in r]
        ax_acc.plot([r["step"] for r in points], [r[key] for r in points], "o-", label=key.replace("_", " "))
    ax_loss.set(xlabel="step", ylabel="loss", title=title)
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_fewshot(per_dataset: dict[str, dict]) -> plt.Figure:
    """Accuracy against shots per class, one panel per dataset: each model's mean over seeds with its 95% CI."""
    fig, axes = plt.subplots(1, len(per_dataset), figsize=(4.2 * len(per_dataset), 3.6), squeeze=False)
    for ax, (name, result) in zip(axes[0], per_dataset.items(), strict=True):
        for kind, style in (("pretrained", "o-"), ("random_init", "s--")):
            shots = [int(k) for k in result[kind]]
            means = [v["mean"] for v in result[kind].values()]
            errors = [v["ci95"] for v in result[kind].values()]
            ax.errorbar(shots, means, yerr=errors, fmt=style, capsize=3, label=kind.replace("_", " "))
        ax.axhline(1.0 / result["num_classes"], color="grey", lw=0.8, ls=":", label="chance")
        ax.set(xscale="log", xlabel="shots per class", ylabel="accuracy", ylim=(0, 1), title=name)
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
