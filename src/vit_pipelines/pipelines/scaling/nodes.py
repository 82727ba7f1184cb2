"""Nodes of the `scaling` pipeline: the runs are `evaluation.studies.run_arm`; this is the report."""

from __future__ import annotations

import logging
from typing import Any

from matplotlib.figure import Figure

from vit_pipelines.evaluation.plots import plot_scaling
from vit_pipelines.evaluation.studies import largest_shots, study_table

log = logging.getLogger(__name__)

PAPER = (
    "BiT ResNets beat ViT when pretrained on little data and plateau sooner; ViT overtakes them as the data "
    "grows (Fig. 3, 4), and reaches the same transfer accuracy with 2-4x less pretraining compute (Fig. 5)"
)


def report_scaling(**results: dict[str, Any]) -> tuple[dict[str, Any], Figure]:
    """The table (one row per model and subset: images, epochs, exaFLOPs, scores with their seed spread), the
    ViT-minus-ResNet gap per subset, and the figure of Fig. 3-5. `results` are keyed `<model>__<subset>`."""
    rows = study_table(results, ("model", "subset"))
    shots = largest_shots(rows)
    metrics = [m for m in ("finetune/mean", shots) if m in rows[0]["summary"]]
    gaps = {}
    for subset in dict.fromkeys(r["subset"] for r in rows):
        here = [r for r in rows if r["subset"] == subset]
        vit = [r for r in here if r["architecture"] == "ViT"]
        resnet = [r for r in here if r["architecture"] == "BiT ResNet"]
        if vit and resnet:
            gaps[subset] = {
                "pretrain_images": here[0]["pretrain_images"],
                **{
                    m: max(r["summary"][m]["mean"] for r in vit)
                    - max(r["summary"][m]["mean"] for r in resnet)
                    for m in metrics
                },
            }
    ordered = sorted(gaps.values(), key=lambda g: g["pretrain_images"])
    trend = {m: ordered[-1][m] - ordered[0][m] for m in metrics} if len(ordered) > 1 else {}
    log.info("ViT minus ResNet accuracy per subset: %s", gaps)
    report = {
        "paper": PAPER,
        "vit_minus_resnet": gaps,
        "gap_change_smallest_to_largest": trend,
        "paper_direction_holds": {m: t > 0 for m, t in trend.items()},
        "seeds": len(rows[0]["runs"]),
        "rows": rows,
    }
    return report, plot_scaling(rows, shots)
