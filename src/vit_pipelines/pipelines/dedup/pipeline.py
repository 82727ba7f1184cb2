from kedro.pipeline import Pipeline, node, pipeline

from vit_pipelines.pipelines.dedup import nodes
from vit_pipelines.pipelines.downstream import downstream_datasets, downstream_split


def create_pipeline(**kwargs) -> Pipeline:
    # every downstream set's TEST split (conf/base/globals.yml: downstream_datasets), one keyword each
    test_sets = {name: downstream_split(name, "test") for name in downstream_datasets()}
    return pipeline(
        [
            node(
                nodes.find_duplicates,
                inputs={"pretrain": "pretrain_raw", "params": "params:dedup", **test_sets},
                outputs="dedup_matches",
                name="find_test_duplicates",
            ),
            node(
                nodes.report_duplicates,
                inputs=["pretrain_raw", "dedup_matches", "params:dedup"],
                outputs="dedup_report",
                name="report_test_duplicates",
            ),
            node(
                nodes.plot_duplicates,
                inputs={
                    "pretrain": "pretrain_raw",
                    "duplicates": "dedup_matches",
                    "params": "params:dedup",
                    **test_sets,
                },
                outputs="dedup_pairs",
                name="plot_test_duplicates",
            ),
        ]
    )
