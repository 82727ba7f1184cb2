from kedro.pipeline import Pipeline, node

from vit_pipelines.pipelines.ablations import nodes
from vit_pipelines.pipelines.downstream import names_from_globals
from vit_pipelines.pipelines.pretrain.pipeline import data_pipeline
from vit_pipelines.pipelines.studies import study_run

DEFAULT_ARMS = [
    "posemb_none",
    "posemb_1d",
    "posemb_2d",
    "posemb_sincos",
    "token_lr_high",
    "token_lr_low",
    "gap_lr_high",
    "gap_lr_low",
]


def create_pipeline(**kwargs) -> Pipeline:
    """The pretraining data (de-duplicated, cached), then one run per arm (`ablation_arms` in globals.yml) in
    namespace `ablations.<arm>`, and the report."""
    arms = names_from_globals("ablation_arms", DEFAULT_ARMS)
    runs = [study_run("ablations", arm, f"ablations.arms.{arm}", "ablations.subset") for arm in arms]
    report = node(
        nodes.report_ablations,
        inputs={arm: f"ablations.{arm}.result" for arm in arms},
        outputs=["ablation_results", "ablation_figure"],
        name="report_ablations",
        namespace="ablations",
    )
    return data_pipeline() + sum(runs, Pipeline([])) + Pipeline([report])
