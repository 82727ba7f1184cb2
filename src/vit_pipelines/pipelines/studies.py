"""What the two study pipelines share: one namespaced node per pretraining run, and the data they read.

Kedro builds pipelines before it reads parameters, so the run names live in `globals.yml` (`scaling_models`,
`scaling_subsets`, `ablation_arms`); each name's settings are an entry of the study's parameters."""

from __future__ import annotations

from kedro.pipeline import Pipeline, node

from vit_pipelines.evaluation.studies import run_arm
from vit_pipelines.pipelines.downstream import downstream_datasets, downstream_split


def study_run(study: str, run: str, arm: str, subset: str) -> Pipeline:
    """The node that pretrains and scores one run of `study` in namespace `<study>.<run>`: its arm's settings
    are `params:<arm>`, its subset's `params:<subset>`; it outputs `<study>.<run>.result`."""
    downstream = {
        f"{n}_{split}": downstream_split(n, split)
        for n in downstream_datasets()
        for split in ("train", "test")
    }
    return Pipeline(
        [
            node(
                run_arm,
                inputs={
                    "train_cache": "pretrain_cache_train",
                    "minival": "pretrain_cache_minival",
                    "pretrain": "params:pretrain",
                    "study": f"params:{study}",
                    "arm": f"params:{arm}",
                    "subset": f"params:{subset}",
                    **downstream,
                },
                outputs=f"{study}.{run}.result",
                name="pretrain_and_score",
                namespace=f"{study}.{run}",
            )
        ]
    )
