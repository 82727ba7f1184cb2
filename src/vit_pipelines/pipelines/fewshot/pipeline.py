from kedro.pipeline import Pipeline, node, pipeline

from vit_pipelines.pipelines.downstream import for_each_downstream_dataset
from vit_pipelines.pipelines.fewshot import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Namespace `fewshot`: the model, one namespace per downstream dataset (`fewshot.<name>`), one report."""
    select = node(
        nodes.select_model,
        ["pretrained_model", "params:fewshot"],
        "fewshot_model",
        name="select_fewshot_model",
        namespace="fewshot",
    )
    evaluate = node(
        nodes.evaluate_dataset,
        inputs=["fewshot_model", "train_raw", "test_raw", "params:fewshot"],
        outputs="results",
        name="fewshot_ridge_grid",
    )
    per_dataset, names = for_each_downstream_dataset(
        pipeline([evaluate]), "fewshot", shared={"fewshot_model"}, parameters={"params:fewshot"}
    )
    summary = node(
        nodes.report,
        inputs={name: f"fewshot.{name}.results" for name in names},
        outputs=["fewshot_results", "fewshot_plot"],
        name="report_fewshot",
        namespace="fewshot",
    )
    return pipeline([select]) + per_dataset + pipeline([summary])
