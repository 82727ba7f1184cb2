"""Nodes of the `ablations` pipeline: the runs are `evaluation.studies.run_arm`; this is the report."""

from __future__ import annotations

import logging
from typing import Any

from matplotlib.figure import Figure

from vit_pipelines.evaluation.plots import plot_ablations
from vit_pipelines.evaluation.studies import largest_shots, study_table

log = logging.getLogger(__name__)

PAPER = {  # ViT-B/16 on JFT, ImageNet 5-shot linear accuracy (Table 8); Fig. 9
    "posemb": {"none": 0.614, "1-D learned": 0.642, "2-D learned": 0.640, "relative": 0.640},
    "head": "[class] token and GAP reach the same accuracy, but GAP needs a lower learning rate",
}


def report_ablations(**results: dict[str, Any]) -> tuple[dict[str, Any], Figure]:
    """The table (one row per arm, scores with their seed spread), per group the best and worst arm and the
    largest seed spread (what a difference must exceed to be signal), and the figure."""
    rows = study_table(results, ("arm",))
    shots = largest_shots(rows)
    groups = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        arms = {r["label"]: r["summary"] for r in rows if r["group"] == group}
        groups[group] = {
            metric: {
                "mean": {label: s[metric]["mean"] for label, s in arms.items()},
                "best": max(arms, key=lambda label: arms[label][metric]["mean"]),
                "worst": min(arms, key=lambda label: arms[label][metric]["mean"]),
                "largest_seed_std": max(s[metric]["std"] for s in arms.values()),
            }
            for metric in ("minival_accuracy", shots)
        }
    log.info("ablations: %s", {g: v[shots]["mean"] for g, v in groups.items()})
    report = {"paper": PAPER, "groups": groups, "seeds": len(rows[0]["runs"]), "rows": rows}
    return report, plot_ablations(rows, shots)
