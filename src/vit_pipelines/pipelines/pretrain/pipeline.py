from kedro.pipeline import Pipeline, node, pipeline

from vit_pipelines.pipelines import dedup
from vit_pipelines.pipelines.downstream import downstream_datasets, downstream_split
from vit_pipelines.pipelines.pretrain import nodes


def data_pipeline() -> Pipeline:
    """The pretraining images less their duplicates of downstream test images, written once as a cache."""
    return dedup.create_pipeline() + pipeline(
        [
            node(
                nodes.prepare_cache,
                inputs=["pretrain_raw", "dedup_matches", "params:pretrain.data"],
                outputs=["pretrain_cache_train", "pretrain_cache_minival"],
                name="preprocess_pretrain_images",
            ),
            node(
                nodes.report_cache,
                inputs=["pretrain_cache_train", "pretrain_cache_minival"],
                outputs="pretrain_preprocess_report",
                name="report_pretrain_cache",
            ),
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return data_pipeline() + pipeline(
        [
            node(
                nodes.pretrain,
                inputs={
                    "train_cache": "pretrain_cache_train",
                    "minival": "pretrain_cache_minival",
                    "params": "params:pretrain",
                    **{
                        f"{n}_{split}": downstream_split(n, split)
                        for n in downstream_datasets()
                        for split in ("train", "test")
                    },
                },
                outputs=["pretrained_model", "pretrain_history"],
                name="pretrain_vit",
            ),
            node(
                nodes.evaluate,
                inputs=["pretrained_model", "pretrain_cache_minival", "pretrain_history", "params:pretrain"],
                outputs=["pretrain_metrics", "pretrain_curves"],
                name="evaluate_pretrained_vit",
            ),
        ]
    )
