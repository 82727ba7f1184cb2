from kedro.pipeline import Pipeline, node, pipeline

from vit_pipelines.pipelines.analysis import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Four figures of the paper's §4.5 for the pretrained model, their numbers in one JSON."""
    model = "model_for_analysis"  # in memory (the catalog pattern analysis_{figure} is for the PNGs)
    return pipeline(
        [
            node(
                nodes.select_model,
                ["pretrained_model", "params:analysis"],
                model,
                name="select_analysis_model",
            ),
            node(
                nodes.patch_embedding,
                [model, "params:analysis"],
                ["patch_numbers", "analysis_patch_embedding"],
                name="patch_embedding_components",
            ),  # fmt: skip
            node(
                nodes.position_embedding,
                model,
                ["position_numbers", "analysis_position_similarity"],
                name="position_embedding_similarity",
            ),  # fmt: skip
            node(
                nodes.attention_distance,
                [model, "pretrain_cache_minival", "params:analysis"],
                ["distance_numbers", "analysis_attention_distance"],
                name="mean_attention_distance",
            ),  # fmt: skip
            node(
                nodes.attention_rollout,
                [model, "pretrain_cache_minival", "params:analysis"],
                ["rollout_numbers", "analysis_attention_rollout"],
                name="attention_rollout_maps",
            ),  # fmt: skip
            node(
                nodes.report,
                {
                    "model": model,
                    "patch_embedding": "patch_numbers",
                    "position_embedding": "position_numbers",
                    "attention_distance": "distance_numbers",
                    "attention_rollout": "rollout_numbers",
                },  # fmt: skip
                "analysis_metrics",
                name="report_analysis",
            ),
        ]
    )
