from kedro.pipeline import Pipeline, node, pipeline

from vit_pipelines.pipelines.analysis import nodes

MODEL = "model_for_analysis"  # in memory (the catalog pattern `analysis_{figure}` is for the PNGs)
FIGURES = {  # figure: (node function, inputs after the model)
    "patch_embedding": (nodes.patch_embedding, ["params:analysis"]),
    "position_similarity": (nodes.position_embedding, []),
    "attention_distance": (nodes.attention_distance, ["pretrain_cache_minival", "params:analysis"]),
    "attention_rollout": (nodes.attention_rollout, ["pretrain_cache_minival", "params:analysis"]),
}


def create_pipeline(**kwargs) -> Pipeline:
    """Four figures of the paper's §4.5 for the pretrained model (`analysis_<figure>` PNGs), their numbers in
    one JSON."""
    select = node(
        nodes.select_model, ["pretrained_model", "params:analysis"], MODEL, name="select_analysis_model"
    )
    figures = [
        node(function, [MODEL, *inputs], [f"{figure}_numbers", f"analysis_{figure}"], name=f"draw_{figure}")
        for figure, (function, inputs) in FIGURES.items()
    ]
    report = node(
        nodes.report,
        {"model": MODEL, **{figure: f"{figure}_numbers" for figure in FIGURES}},
        "analysis_metrics",
        name="report_analysis",
    )
    return pipeline([select, *figures, report])
