from kedro.pipeline import Pipeline, node, pipeline

from vit_pipelines.pipelines.drloc import nodes
from vit_pipelines.pipelines.pretrain.pipeline import data_pipeline


def create_pipeline(**kwargs) -> Pipeline:
    """The pretraining data (de-duplicated, cached), then the same model and budget as `pretrain` trained from
    scratch with and without the DRLoc loss over several seeds."""
    return data_pipeline() + pipeline(
        [
            node(
                nodes.compare_drloc,
                inputs=[
                    "pretrain_cache_train",
                    "pretrain_cache_minival",
                    "params:pretrain",
                    "params:drloc_experiment",
                ],
                outputs=["drloc_results", "drloc_comparison"],
                name="compare_with_and_without_drloc",
            )
        ]
    )
