from kedro.pipeline import Pipeline, node

from vit_pipelines.pipelines.downstream import names_from_globals
from vit_pipelines.pipelines.pretrain.pipeline import data_pipeline
from vit_pipelines.pipelines.scaling import nodes
from vit_pipelines.pipelines.studies import study_run

DEFAULT_MODELS = ["vit_ti", "bit_r26"]
DEFAULT_SUBSETS = ["p10", "p30", "p100"]


def create_pipeline(**kwargs) -> Pipeline:
    """The pretraining data (de-duplicated, cached), then one run per model (`scaling_models` in globals.yml)
    and nested subset (`scaling_subsets`), each in namespace `scaling.<model>.<subset>`, and the report."""
    models = names_from_globals("scaling_models", DEFAULT_MODELS)
    subsets = names_from_globals("scaling_subsets", DEFAULT_SUBSETS)
    runs = {f"{m}__{s}": (m, s) for m in models for s in subsets}
    arms = [
        study_run("scaling", f"{m}.{s}", f"scaling.models.{m}", f"scaling.subsets.{s}")
        for m, s in runs.values()
    ]
    report = node(
        nodes.report_scaling,
        inputs={key: f"scaling.{m}.{s}.result" for key, (m, s) in runs.items()},
        outputs=["scaling_results", "scaling_figure"],
        name="report_scaling",
        namespace="scaling",
    )
    return data_pipeline() + sum(arms, Pipeline([])) + Pipeline([report])
