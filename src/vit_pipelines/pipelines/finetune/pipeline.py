from kedro.pipeline import Node, Pipeline, node, pipeline

from vit_pipelines.data.cache import split_minival
from vit_pipelines.pipelines.downstream import for_each_downstream_dataset
from vit_pipelines.pipelines.finetune import nodes


def _sweep_then_train(start: str, tag: str, model: str) -> list[Node]:
    """From the model `start`: every LR of the grid on dev (`<tag>_sweep`), then the best on all of train
    (`model`, `<tag>_result`)."""
    return [
        node(
            nodes.sweep_learning_rates,
            inputs=[start, "dev_train", "dev", "params:finetune"],
            outputs=f"{tag}_sweep",
            name=f"sweep_learning_rates_{tag}",
        ),
        node(
            nodes.finetune_best,
            inputs=[start, "train", "test", f"{tag}_sweep", "params:finetune"],
            outputs=[model, f"{tag}_result"],
            name=f"train_best_lr_{tag}",
        ),
    ]


def create_pipeline(**kwargs) -> Pipeline:
    """Namespace `finetune`: the start models, one namespace per downstream dataset (`finetune.<name>`), one
    report."""
    select = pipeline(
        [
            node(
                nodes.select_model,
                ["pretrained_model", "params:finetune"],
                "finetune_pretrained_model",
                name="select_finetune_model",
                namespace="finetune",
            ),
            node(
                nodes.from_scratch_model,
                ["finetune_pretrained_model", "params:finetune"],
                "finetune_scratch_model",
                name="init_from_scratch_model",
                namespace="finetune",
            ),
        ]
    )
    steps = pipeline(
        [
            node(
                nodes.cache_splits,
                inputs=["train_raw", "test_raw", "params:finetune"],
                outputs=["train", "test"],
                name="cache_finetune_images",
            ),
            node(
                split_minival,
                inputs=["train", "params:finetune.dev_fraction", "params:finetune.seed"],
                outputs=["dev_train", "dev"],
                name="carve_dev_split",
            ),
            *_sweep_then_train("finetune_pretrained_model", "pretrained", model="model"),
            # the baseline: the same grid, budget and resolution from random weights
            *_sweep_then_train("finetune_scratch_model", "scratch", model="scratch_model"),
            node(
                nodes.with_baseline,
                inputs=["pretrained_result", "scratch_result"],
                outputs="result",
                name="compare_with_from_scratch",
            ),
        ]
    )
    per_dataset, names = for_each_downstream_dataset(
        steps,
        "finetune",
        shared={"finetune_pretrained_model", "finetune_scratch_model"},
        parameters={"params:finetune", "params:finetune.dev_fraction", "params:finetune.seed"},
    )
    summary = node(
        nodes.report,
        inputs={name: f"finetune.{name}.result" for name in names},
        outputs=["finetune_metrics", "finetune_curves"],
        name="report_finetune",
        namespace="finetune",
    )
    return select + per_dataset + pipeline([summary])
