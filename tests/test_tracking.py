"""The MLflow hook's own arithmetic: parameter and metric names, per-step histories, child runs, store paths.
The runs themselves are checked end to end in test_pipelines (the store after real runs) and test_viz (the UI)."""

from pathlib import Path

from vit_pipelines.tracking import TrackWithMlflow, child_of, flat_metrics, flat_params, tracking_paths


def test_parameters_are_flattened_by_path_with_lists_kept_whole():
    params = flat_params(
        {"pretrain": {"train": {"lr": 0.001, "betas": [0.9, 0.999], "drloc": None}, "n": "x"}}
    )
    assert params == {
        "pretrain.train.lr": "0.001",
        "pretrain.train.betas": "[0.9, 0.999]",
        "pretrain.train.drloc": "null",
        "pretrain.n": "x",
    }


def test_report_numbers_become_metrics_and_histories_become_per_step_series():
    report = {
        "records": [{"step": 2, "loss": 1.5, "lr": 0.1}, {"step": 4, "loss": 1.2, "minival_accuracy": 0.3}],
        "wall_seconds": 12.5,
        "fewshot": {"digits 5-shot": 0.4, "ok": True, "missing": None, "nan": float("nan")},
        "config": {"batch_size": 64},  # settings, not numbers of the run
        "result": {"history": [{"step": 1, "loss": 2.0}]},
    }
    scalars, series = flat_metrics(report)
    assert scalars == {"wall_seconds": 12.5, "fewshot.digits 5-shot": 0.4}
    assert series == [
        (2, {"loss": 1.5, "lr": 0.1}),
        (4, {"loss": 1.2, "minival_accuracy": 0.3}),
        (1, {"result.history.loss": 2.0}),
    ]
    assert flat_metrics({"a(b)": 1}, "x.")[0] == {"x.a_b_": 1.0}  # characters MLflow refuses become _


def test_namespaced_outputs_go_to_a_child_run_per_dataset_or_task():
    assert child_of("finetune.pets.pretrained_result") == ("pets", "pretrained_result")
    assert child_of("vtab.test.caltech101.result") == ("caltech101", "test.result")
    assert child_of("pretrain_metrics") == (None, "pretrain_metrics")


def test_store_paths_are_under_the_data_folder_unless_absolute_or_remote(tmp_path):
    uri, artifacts = tracking_paths({}, tmp_path, "data/tiny")
    assert uri == f"sqlite:///{tmp_path}/data/tiny/09_tracking/mlflow.db"
    assert artifacts == f"{tmp_path}/data/tiny/09_tracking/artifacts"
    settings = {"uri": "http://tracking:5000", "artifacts": "s3://bucket/runs"}
    assert tracking_paths(settings, tmp_path, "data") == ("http://tracking:5000", "s3://bucket/runs")


def test_tracking_turned_off_starts_no_run(tmp_path):
    hook = TrackWithMlflow()
    hook.settings, hook.project = {"enabled": False}, Path(tmp_path)
    hook.before_pipeline_run({"pipeline_names": ["pretrain"]}, pipeline=None, catalog=None)
    hook.after_dataset_saved("pretrain_metrics", {"minival_accuracy": 0.5})
    hook.after_pipeline_run()
    assert hook.run_id is None and not list(tmp_path.rglob("*"))
