from kedro.pipeline import Pipeline, node, pipeline

from vit_pipelines.pipelines.pretrain import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.preprocess,
                inputs=["pretrain_raw", "params:pretrain.data"],
                outputs=["pretrain_cache_train", "pretrain_cache_minival", "pretrain_preprocess_report"],
                name="preprocess_pretrain_images",
            ),
            node(
                nodes.pretrain,
                inputs=["pretrain_cache_train", "pretrain_cache_minival", "params:pretrain"],
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
