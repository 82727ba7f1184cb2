from kedro.pipeline import Pipeline, node, pipeline

from vit_pipelines.data.cache import split_minival
from vit_pipelines.pipelines.downstream import downstream_datasets
from vit_pipelines.pipelines.finetune import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """One namespace per downstream dataset (`finetune.<name>`), then one report over all of them."""
    select = pipeline(
        [
            node(
                nodes.select_model,
                ["pretrained_model", "params:finetune"],
                "finetune_pretrained_model",
                name="select_finetune_model",
            ),
            node(
                nodes.from_scratch_model,
                ["finetune_pretrained_model", "params:finetune"],
                "finetune_scratch_model",
                name="init_from_scratch_model",
            ),
        ]
    )
    per_dataset = [
        pipeline(
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
                node(
                    nodes.sweep_learning_rates,
                    inputs=["finetune_pretrained_model", "dev_train", "dev", "params:finetune"],
                    outputs="sweep",
                    name="sweep_learning_rates",
                ),
                node(
                    nodes.finetune_best,
                    inputs=["finetune_pretrained_model", "train", "test", "sweep", "params:finetune"],
                    outputs=["model", "pretrained_result"],
                    name="finetune_best_lr",
                ),
                # the baseline: the same grid, budget and resolution from random weights
                node(
                    nodes.sweep_learning_rates,
                    inputs=["finetune_scratch_model", "dev_train", "dev", "params:finetune"],
                    outputs="scratch_sweep",
                    name="sweep_learning_rates_from_scratch",
                ),
                node(
                    nodes.finetune_best,
                    inputs=["finetune_scratch_model", "train", "test", "scratch_sweep", "params:finetune"],
                    outputs=["scratch_model", "scratch_result"],
                    name="train_best_lr_from_scratch",
                ),
                node(
                    nodes.with_baseline,
                    inputs=["pretrained_result", "scratch_result"],
                    outputs="result",
                    name="compare_with_from_scratch",
                ),
            ],
            namespace=f"finetune.{name}",
            inputs={
                "finetune_pretrained_model": "finetune_pretrained_model",
                "finetune_scratch_model": "finetune_scratch_model",
                "train_raw": f"downstream.{name}.train",
                "test_raw": f"downstream.{name}.test",
            },
            parameters={
                "params:finetune": "params:finetune",
                "params:finetune.dev_fraction": "params:finetune.dev_fraction",
                "params:finetune.seed": "params:finetune.seed",
            },
        )
        for name in downstream_datasets()
    ]
    summary = node(
        nodes.report,
        inputs={name: f"finetune.{name}.result" for name in downstream_datasets()},
        outputs=["finetune_metrics", "finetune_curves"],
        name="report_finetune",
    )
    return sum(per_dataset, select) + pipeline([summary])
