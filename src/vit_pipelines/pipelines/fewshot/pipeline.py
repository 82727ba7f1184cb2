from kedro.pipeline import Pipeline, node, pipeline

from vit_pipelines.pipelines.downstream import downstream_datasets
from vit_pipelines.pipelines.fewshot import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """One namespace per downstream dataset (`fewshot.<name>`), then one report over all of them."""
    select = pipeline(
        [
            node(
                nodes.select_model,
                ["pretrained_model", "params:fewshot"],
                "fewshot_model",
                name="select_fewshot_model",
            )
        ]
    )
    per_dataset = [
        pipeline(
            [
                node(
                    nodes.evaluate_dataset,
                    inputs=["fewshot_model", "train", "test", "params:fewshot"],
                    outputs="results",
                    name="fewshot_ridge_grid",
                )
            ],
            namespace=f"fewshot.{name}",
            inputs={
                "fewshot_model": "fewshot_model",
                "train": f"downstream.{name}.train",
                "test": f"downstream.{name}.test",
            },
            parameters={"params:fewshot": "params:fewshot"},
        )
        for name in downstream_datasets()
    ]
    summary = node(
        nodes.report,
        inputs={name: f"fewshot.{name}.results" for name in downstream_datasets()},
        outputs=["fewshot_results", "fewshot_plot"],
        name="report_fewshot",
    )
    return sum(per_dataset, select) + pipeline([summary])
