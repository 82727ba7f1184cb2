"""End to end: `kedro run --env tiny --pipelines pretrain` in a fresh copy of the project, then a resume."""

import json
import math
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import nbformat
import PIL.Image
import pytest
import yaml
from conftest import copy_project, newest, run_in
from nbclient import NotebookClient
from test_streaming import write_tar

from vit_pipelines.data import embedded
from vit_pipelines.data.cache import open_shards, read_manifest
from vit_pipelines.data.sources import load_image_dataset
from vit_pipelines.models.checkpoints import newest_version
from vit_pipelines.training.saving import load_model

pytestmark = pytest.mark.slow


def kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run_in(project, "kedro", *args)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("project"))


def test_registry_lists_the_pipelines(project):
    listed = kedro(project, "registry", "list").stdout
    assert "pretrain" in listed and "__default__" in listed
    described = kedro(project, "registry", "describe", "scaling").stdout
    nodes = set(re.findall(r"^- (\S+) \(", described, flags=re.MULTILINE))
    # one namespace per model and subset (globals.yml), each a group of its own in kedro viz
    runs = {n for n in nodes if n.endswith("pretrain_and_score")}
    expected = {
        f"scaling.{m}.{s}.pretrain_and_score" for m in ("vit_ti", "bit_r26") for s in ("p10", "p30", "p100")
    }
    assert runs == expected and "scaling.report_scaling" in nodes


def test_tiny_dedup_removes_the_leaked_test_copies(project):
    result = kedro(project, "run", "--env", "tiny", "--pipelines", "dedup")
    summary = [line for line in (result.stdout + result.stderr).splitlines() if "borderline;" in line]
    assert len(summary) == 1 and "planted leaks" in summary[0]  # a log line is not wrapped off a terminal
    out = project / "data" / "tiny"
    report = json.loads((out / "08_reporting" / "dedup_report.json").read_text())
    leaks = embedded.leaked_copies(600)  # conf/tiny/catalog.yml: 600 images, one leaked copy per test set
    assert report["known_leaks"]["found"] == report["known_leaks"]["leaked_copies"] == len(leaks) == 3
    assert set(report["test_sets"]) == set(embedded.DOWNSTREAM_NAMES)
    removed = {pair[0] for s in report["test_sets"].values() for pair in s["pairs"]}
    assert {leak["pretrain_index"] for leak in leaks} <= removed and len(removed) == report["removed"]
    matches = json.loads((out / "02_intermediate" / "dedup_matches.json").read_text())["matches"]
    assert {m["pretrain_index"] for m in matches} == removed  # a filter over the source, not a copy of it
    assert sum(report["bands"].values()) == report["removed"] == len(matches)
    assert {m["band"] for m in matches} <= {"certain", "borderline"} and all(
        m["shape"] > 0.9 for m in matches
    )
    lowest = report["lowest_scores"]
    assert [m["score"] for m in lowest] == sorted(m["score"] for m in matches)[: len(lowest)]
    assert report["known_leaks"]["removals_that_are_leaks"] == f"3 of {report['removed']}"
    with PIL.Image.open(out / "08_reporting" / "dedup_pairs.png") as pairs:
        assert pairs.size[0] > 600


def test_tiny_pretrain_runs_end_to_end_and_resumes(project):
    run = kedro(project, "run", "--env", "tiny", "--pipelines", "pretrain")
    out = project / "data" / "tiny"
    metrics = json.loads(newest(out / "08_reporting" / "pretrain_metrics.json").read_text())
    # The run ends saying what it found, where it wrote it and what to run next; summary.md gathers it.
    said = run.stdout + run.stderr
    headline = f"minival accuracy {metrics['minival_accuracy']:.1%} (chance 2.5%) after 6 steps"
    assert "Finished `kedro run --env tiny --pipelines pretrain`" in said and headline in said
    assert "next: kedro run --env tiny --pipelines fewshot;" in said
    summary = (out / "08_reporting" / "summary.md").read_text()
    assert (
        headline in summary
        and "Not run yet: `fewshot`, `finetune`, `vtab`, `drloc`, `scaling`, `ablations`, `analysis`."
        in summary
    )
    for key in ("minival_accuracy", "num_classes", "steps", "train_images_per_second", "wall_seconds"):
        assert key in metrics, key
    assert metrics["num_classes"] == len(embedded.PRETRAIN_CLASS_NAMES)
    labels = json.loads((newest_version(out / "06_models" / "pretrain") / "labels.json").read_text())[
        "id2label"
    ]
    assert [labels[str(i)] for i in range(len(labels))] == list(embedded.PRETRAIN_CLASS_NAMES)
    assert metrics["steps"] == 6 and metrics["resumed_from_step"] == 0
    assert 0.0 <= metrics["minival_accuracy"] <= 1.0 and metrics["train_images_per_second"] > 0
    # The few-shot probe ran during pretraining on every downstream set (paper Fig. 4).
    probes = {f"fewshot_{n}_{k}shot_accuracy" for n in embedded.DOWNSTREAM_NAMES for k in (5, 10)}
    assert set(metrics["fewshot"]) == probes and all(0 <= v <= 1 for v in metrics["fewshot"].values())
    history = json.loads(newest(out / "07_model_output" / "pretrain_history.json").read_text())["records"]
    assert [r["step"] for r in history if "fewshot_digits_5shot_accuracy" in r] == [3, 6]
    report = json.loads((out / "08_reporting" / "pretrain_preprocess_report.json").read_text())
    kept = json.loads((out / "08_reporting" / "dedup_report.json").read_text())["kept"]  # dedup ran first
    assert kept < 600 and report["images_in"] == kept and report["images_kept"] == kept
    assert report["train_images"] + report["minival_images"] == kept
    # one copy: the cache's shards and manifests alone, no leftovers of intermediate steps
    cache = out / "05_model_input" / "pretrain"
    files = {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()}
    shards = {
        f"{s}/{shard['file']}" for s in ("train", "minival") for shard in read_manifest(cache / s)["shards"]
    }
    assert files == shards | {"train/manifest.json", "minival/manifest.json"} and len(shards) > 2
    matches = json.loads((out / "02_intermediate" / "dedup_matches.json").read_text())["matches"]
    removed = {m["pretrain_index"] for m in matches}
    rows = [*open_shards(cache / "train")["source_index"], *open_shards(cache / "minival")["source_index"]]
    assert sorted(rows) == sorted(set(range(600)) - removed)
    with PIL.Image.open(newest(out / "08_reporting" / "pretrain_curves.png")) as curves:
        assert curves.size[0] > 600
    model = load_model(out / "06_models" / "pretrain")
    assert model.config.image_size == (16, 16) and model.config.num_classes == metrics["num_classes"]
    runs = list((out / "06_models" / "pretrain" / "checkpoints").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in runs[0].glob("step_*")) == [
        "step_0000003",
        "step_0000006",
    ]
    assert not (project / "data" / "08_reporting" / "pretrain_metrics.json").exists()  # tiny writes aside

    # The same command again finds the finished run: a new version with the run's own numbers, the first kept;
    # de-dup reads its search of the same images and settings, the cache is kept as it is.
    rerun = kedro(project, "run", "--env", "tiny", "--pipelines", "pretrain")
    said = rerun.stdout + rerun.stderr
    assert "the same images and settings were searched before" in said and "already holds these rows" in said
    versions = sorted((out / "08_reporting" / "pretrain_metrics.json").iterdir())
    again = json.loads(newest(out / "08_reporting" / "pretrain_metrics.json").read_text())
    assert len(versions) == 2 and again == {
        **metrics,
        "resumed_from_step": 6,  # nothing left to train: the run's time, throughput and curves are the first's
        "minival_accuracy": pytest.approx(metrics["minival_accuracy"]),
    }
    assert len(list((out / "06_models" / "pretrain").glob("*/model.safetensors"))) == 2


def test_tiny_fewshot_evaluates_the_pretrained_model_and_a_random_baseline(project):
    # Runs after the pretrain test above: the tiny pretrained model is in the copy's data/tiny/06_models.
    kedro(project, "run", "--env", "tiny", "--pipelines", "fewshot")
    out = project / "data" / "tiny"
    results = json.loads(newest(out / "08_reporting" / "fewshot_results.json").read_text())
    assert set(results["datasets"]) == set(embedded.DOWNSTREAM_NAMES)
    for name, result in results["datasets"].items():
        for kind in ("pretrained", "random_init"):
            assert set(result[kind]) == {"1", "5"}, name
            assert all(len(v["per_seed"]) == 2 and 0 <= v["mean"] <= 1 for v in result[kind].values())
        assert result["image_size"] == [16, 16]
        assert result["feature_images_per_rank"] == [result["train_images"] + result["test_images"]]
        assert results["summary"][name]["chance"] == pytest.approx(1 / result["num_classes"])
    with PIL.Image.open(newest(out / "08_reporting" / "fewshot_accuracy.png")) as plot:
        assert plot.size[0] > 900
    cached = sorted(p.name for p in (out / "04_feature" / "fewshot").glob("*.npz"))
    assert len(cached) == 4 * len(embedded.DOWNSTREAM_NAMES)  # (pretrained, random) x (train, test) per set
    kedro(project, "run", "--env", "tiny", "--pipelines", "fewshot")  # features are reused, not recomputed
    assert sorted(p.name for p in (out / "04_feature" / "fewshot").glob("*.npz")) == cached
    assert json.loads(newest(out / "08_reporting" / "fewshot_results.json").read_text()) == results


def test_fewshot_without_a_checkpoint_says_what_to_do(tmp_path_factory, project):
    empty = tmp_path_factory.mktemp("empty")
    for name in ("conf", "src", "pyproject.toml", ".telemetry"):
        source = project / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, empty / name)
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(
        ["kedro", "run", "--env", "tiny", "--pipelines", "fewshot"], cwd=empty, env=env, capture_output=True,
        text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "run `kedro run --env tiny --pipelines pretrain` first" in result.stdout + result.stderr


def test_tiny_finetune_chooses_a_learning_rate_on_dev_and_tests_raw_and_ema_weights(project):
    # Runs after the pretrain test above: it fine-tunes the tiny pretrained model (16 px) at 24 px.
    kedro(project, "run", "--env", "tiny", "--pipelines", "finetune")
    out = project / "data" / "tiny"
    grid = [0.01, 0.03]  # conf/tiny/parameters_finetune.yml: lr_grid, 4 steps, EMA decay 0.5
    metrics = json.loads(newest(out / "08_reporting" / "finetune_metrics.json").read_text())
    assert set(metrics) == set(embedded.DOWNSTREAM_NAMES)
    for name, result in metrics.items():
        dev = result["dev_accuracy"]
        assert set(dev) == {str(lr) for lr in grid} and all(0 <= a <= 1 for a in dev.values())
        assert result["chosen_lr"] in grid and dev[str(result["chosen_lr"])] == max(dev.values())
        assert 0 <= result["test_accuracy"] <= 1 and 0 <= result["test_accuracy_ema"] <= 1
        assert result["image_size"] == [24, 24] and result["pretrain_image_size"] == [16, 16]
        assert result["steps"] == 4 and result["ema_decay"] == 0.5
        assert result["dev_train_images"] + result["dev_images"] == result["train_images"]
        assert result["dev_images"] == pytest.approx(0.1 * result["train_images"], abs=1)
        scratch = result["from_scratch"]  # the same grid and budget from random weights
        assert set(scratch["dev_accuracy"]) == set(dev) and scratch["chosen_lr"] in grid
        assert result["pretraining_gain"] == pytest.approx(
            result["test_accuracy_ema"] - scratch["test_accuracy_ema"]
        )
        model = load_model(out / "06_models" / "finetune" / name)
        assert model.config.image_size == (24, 24) and model.config.num_classes == result["num_classes"]
        assert model.config.representation_size is None  # one linear head, no pre-logits
    with PIL.Image.open(newest(out / "08_reporting" / "finetune_curves.png")) as curves:
        assert curves.size[0] > 900
    # Every run (per dataset, pretrained and from scratch: one per LR and one final) left its last checkpoint.
    finals = list((out / "06_models" / "finetune" / "checkpoints").glob("*/*/step_*"))
    assert len(finals) == 2 * len(embedded.DOWNSTREAM_NAMES) * (len(grid) + 1)
    assert sum((f / "ema.safetensors").exists() for f in finals) == 2 * len(embedded.DOWNSTREAM_NAMES)


def test_tiny_vtab_runs_the_protocol_on_the_embedded_suite(project):
    # Runs after the pretrain test above. conf/tiny/parameters_vtab.yml: 80 / 20 examples, 4 settings, 100 test.
    kedro(project, "run", "--env", "tiny", "--pipelines", "vtab")
    out = project / "data" / "tiny" / "08_reporting"
    results = json.loads(newest(out / "vtab_results.json").read_text())
    assert set(results["tasks"]) == {"digits", "textures", "counting"} and results["failed"] == {}
    assert set(results["group_mean"]) == {"natural", "specialized", "structured"}
    chosen = results["chosen_setting"]["setting"]
    means = results["chosen_setting"]["mean_val200"]
    assert len(means) == 4 and means[chosen] == max(means.values())
    for task in results["tasks"].values():
        assert task["setting"] == chosen and task["train_images"] == 100 and task["test_images"] == 100
        assert set(task["val200"]) == set(means) and 0 <= task["test_accuracy"] <= 1
    assert results["mean"] == pytest.approx(sum(results["group_mean"].values()) / 3)  # one task per group
    with PIL.Image.open(newest(out / "vtab_groups.png")) as plot:
        assert plot.size[0] > 1000


def test_every_run_is_an_mlflow_run_with_its_params_curves_reports_and_children(project):
    # Runs after the pretrain (twice), finetune and vtab tests above, in the same project.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'data' / 'tiny' / '09_tracking' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vit-pipelines").experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    top = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert {"pretrain", "finetune", "vtab"} <= set(top) and all(r.info.status == "FINISHED" for r in runs)
    # pretrain: every parameter of its groups, the training curve per step, evaluations, reports and the model
    pretrain = client.search_runs([experiment], "attributes.run_name = 'pretrain'", max_results=1)[0]
    params = pretrain.data.params
    tiny = yaml.safe_load((project / "conf" / "tiny" / "parameters_pretrain.yml").read_text())["pretrain"]
    assert params["pretrain.train.steps"] == str(tiny["train"]["steps"])  # the run's environment's value
    assert {"pretrain.model.variant", "pretrain.train.steps", "dedup.threshold"} <= set(params)
    loss = client.get_metric_history(pretrain.info.run_id, "loss")
    assert len(loss) >= 2 and [m.step for m in loss] == sorted(m.step for m in loss)
    metrics = pretrain.data.metrics
    assert {
        "minival_accuracy",
        "images_per_second",
        "data_wait_fraction",
        "pretrain_metrics.minival_accuracy",
    } <= set(metrics)
    files = {a.path for path in ("", "reports", "models/pretrained_model") for a in client.list_artifacts(
        pretrain.info.run_id, path)}  # fmt: skip
    assert {"pretrain_curves.png", "reports/pretrain_metrics.json"} <= files
    assert "models/pretrained_model/model.safetensors" in files
    # finetune: one child run per dataset, one run per learning rate of each sweep under it
    children = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == top["finetune"].info.run_id
    }
    assert set(children) == set(embedded.DOWNSTREAM_NAMES)
    for child in children.values():
        assert 0 <= child.data.metrics["pretrained_result.test_accuracy"] <= 1
        assert client.get_metric_history(child.info.run_id, "pretrained_result.history.loss")
        rates = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == child.info.run_id]
        assert sorted(r.info.run_name for r in rates) == sorted(
            f"{start} lr={lr}" for start in ("pretrained", "scratch") for lr in (0.01, 0.03)
        )
        assert all(0 <= r.data.metrics["dev_accuracy"] <= 1 for r in rates)
    # vtab: one child run per task, with its test accuracy
    tasks = {
        r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == top["vtab"].info.run_id
    }
    assert set(tasks) == {"digits", "textures", "counting"}
    assert all(0 <= t.data.metrics["test.result.test_accuracy"] <= 1 for t in tasks.values())


def test_tiny_data_stage_streams_webdataset_shards_into_the_same_cache(tmp_path):
    """The tiny pretraining set as four tar shards behind a `file://` URL: de-dup and the cache see the same
    rows as from the embedded set, read shard by shard, with no copy of the source."""
    project = copy_project(tmp_path / "project")
    data_stage = ("run", "--env", "tiny", "--pipelines", "pretrain", "--to-nodes", "report_pretrain_cache")
    kedro(project, *data_stage)
    out = project / "data" / "tiny"
    embedded_cache = {
        s: open_shards(out / "05_model_input" / "pretrain" / s).to_dict() for s in ("train", "minival")
    }
    embedded_matches = json.loads((out / "02_intermediate" / "dedup_matches.json").read_text())["matches"]

    raw = load_image_dataset("embedded:pretrain", options={"num_images": 600}, cache_dir=tmp_path / "raw")
    shards = tmp_path / "shards"
    shards.mkdir()
    for part in range(4):
        rows = raw[150 * part : 150 * (part + 1)]
        with open(shards / f"train-{part:06d}.tar", "wb") as f:
            write_tar(f, [image["bytes"] for image in rows["image"]], rows["label"], 150 * part)
    with (project / "conf" / "tiny" / "catalog.yml").open("a") as catalog:
        catalog.write(f"""  source: "webdataset:file://{shards}/train-{{{{000000..000003}}}}.tar"\n""")
    kedro(project, *data_stage)
    matches = json.loads((out / "02_intermediate" / "dedup_matches.json").read_text())["matches"]
    assert matches == embedded_matches and len(matches) >= 3
    report = json.loads((out / "08_reporting" / "pretrain_preprocess_report.json").read_text())
    assert report["images_in"] == 600 - len(matches) and not report["skipped"]
    assert report["train"]["shards"] and len(list((out / "01_raw" / "index").glob("*.npy"))) == 4
    for split, expected in embedded_cache.items():
        cache = open_shards(out / "05_model_input" / "pretrain" / split).to_dict()
        assert cache == expected, split  # the same pixels, labels and source rows
    assert not list((out / "01_raw").glob("**/*.tar"))  # read where it lives, not copied in


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path):
    blocked = copy_project(tmp_path / "blocked")
    (blocked / "data" / "tiny").mkdir(parents=True)
    (blocked / "data" / "tiny" / "08_reporting").write_text("a file where a folder should be")
    result = subprocess.run(
        ["kedro", "run", "--env", "tiny", "--pipelines", "pretrain"], cwd=blocked, capture_output=True, text=True,
        timeout=600, check=False, env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "500"},
    )  # fmt: skip
    # (a wide console: rich wraps log lines at its width, which split a long temporary path inside "08_reporting")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "cannot write" in output and "08_reporting is a file" in output, output[
        -3000:
    ]
    assert not (blocked / "data" / "tiny" / "02_intermediate").exists()  # not even de-duplication ran


def test_bad_training_parameters_fail_before_any_work(tmp_path):
    project = copy_project(tmp_path / "project")
    for override, message in (
        (
            "pretrain.train.steps=0",
            "pretrain.train: training parameter steps must be a whole number >= 1, got 0",
        ),
        ("pretrain.train.stpes=5", "unknown parameters ['pretrain.train.stpes']; known here: ["),
        ("pretrain.data.minival_fractoin=0.2", "unknown parameters ['pretrain.data.minival_fractoin']"),
        ("dedup.threshold=2", "dedup.threshold is a cosine or correlation in [-1, 1], got 2"),
    ):
        result = subprocess.run(
            ["kedro", "run", "--env", "tiny", "--pipelines", "pretrain", "--params", override], cwd=project,
            capture_output=True, text=True, timeout=600, check=False,
            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "500"},
        )  # fmt: skip
        # one line on stderr, no traceback on screen; the traceback kept in the log file
        error, pointer = result.stderr.strip().splitlines()[-2:]
        assert result.returncode == 1 and error.startswith("Error: ") and message in error, result.stderr[
            -2000:
        ]
        assert "Traceback" not in result.stdout + result.stderr and "logs/last_error.log" in pointer
        assert message in (project / "logs" / "last_error.log").read_text()
        assert not (project / "data" / "tiny" / "02_intermediate").exists()  # not even de-duplication ran


def test_the_run_environment_decides_the_downstream_sets_as_kedro_does(tmp_path):
    """`--env tiny` reads base + tiny, not local, for the lists the pipelines are built from too."""
    from vit_pipelines.pipelines.downstream import downstream_datasets

    project = copy_project(tmp_path / "project")
    (project / "conf" / "local" / "globals.yml").write_text("downstream_datasets: [textures]\n")
    with open(project / "conf" / "tiny" / "globals.yml", "a") as tiny:
        tiny.write("downstream_datasets: [digits]\n")
    assert downstream_datasets(project / "conf") == ["textures"]
    assert downstream_datasets(project / "conf", env="tiny") == ["digits"]
    kedro(project, "run", "--env", "tiny", "--pipelines", "dedup")
    report = json.loads((project / "data" / "tiny" / "08_reporting" / "dedup_report.json").read_text())
    assert list(report["test_sets"]) == ["digits"]


def test_a_second_run_into_the_same_data_folder_is_refused_naming_the_first(tmp_path):
    project = copy_project(tmp_path / "project")
    with subprocess.Popen(["sleep", "120"]) as first:  # a live process holding the tiny data folder's lock
        folder = project / "data" / "tiny"
        folder.mkdir(parents=True)
        holder = {"pid": first.pid, "host": socket.gethostname(), "started": "now", "command": "kedro run"}
        (folder / ".run.lock").write_text(json.dumps(holder))
        result = subprocess.run(
            ["kedro", "run", "--env", "tiny", "--pipelines", "dedup"], cwd=project, capture_output=True, text=True,
            timeout=600, check=False, env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "500"},
        )  # fmt: skip
        first.kill()
    output = result.stdout + result.stderr
    assert result.returncode == 1 and f"another run is writing into {folder}: pid {first.pid}" in output, (
        output[-2000:]
    )
    assert "Traceback" not in output
    assert not (folder / "02_intermediate").exists()
    kedro(
        project, "run", "--env", "tiny", "--pipelines", "dedup"
    )  # that run gone: its stale lock is taken over
    assert (folder / "02_intermediate" / "dedup_matches.json").exists() and not (
        folder / ".run.lock"
    ).exists()


def test_tiny_analysis_draws_the_four_figures_through_the_catalog(project):
    # Runs after the pretrain test above.
    kedro(project, "run", "--env", "tiny", "--pipelines", "analysis")
    out = project / "data" / "tiny" / "08_reporting"
    figures = sorted(p.name for p in (out / "analysis").glob("*.png/*/*.png"))
    assert figures == ["attention_distance.png", "attention_rollout.png", "patch_embedding.png",
                       "position_similarity.png"]  # fmt: skip
    numbers = json.loads(newest(out / "analysis.json").read_text())
    layers, heads = numbers["model"]["depth"], numbers["model"]["num_heads"]
    assert len(numbers["attention_distance"]["mean_attention_distance_px"]) == layers
    assert all(len(row) == heads for row in numbers["attention_distance"]["mean_attention_distance_px"])
    assert len(numbers["patch_embedding"]["explained_variance"]) == 7  # conf/tiny: components 7
    assert len(numbers["attention_rollout"]["rollout_maps"]) == 4


def test_the_analysis_notebook_runs_headless_from_its_own_folder(project, monkeypatch):
    """After the tiny analysis run above, `notebooks/analysis.ipynb` executes with its kernel started in
    `notebooks/` (as Jupyter and `kedro jupyter notebook` start it), finds its figures from the project root and
    draws its last figure inline."""
    monkeypatch.setenv("KEDRO_ENV", "tiny")
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "1")
    notebook = nbformat.read(project / "notebooks" / "analysis.ipynb", as_version=4)
    resources = {"metadata": {"path": str(project / "notebooks")}}
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    images = [any("image/png" in out.get("data", {}) for out in cell.outputs) for cell in code]
    assert images == [
        False,
        False,
        True,
        True,
        True,
        True,
        True,
    ]  # the four saved figures, then the drawn one


def test_tiny_scaling_study_pretrains_vit_and_resnet_on_nested_subsets_and_skips_finished_runs(project):
    kedro(project, "run", "--env", "tiny", "--pipelines", "scaling")
    out = project / "data" / "tiny"
    results = json.loads(newest(out / "08_reporting" / "scaling_results.json").read_text())
    rows = {(r["model"], r["subset"]): r for r in results["rows"]}
    assert set(rows) == {(m, s) for m in ("vit_ti", "bit_r26") for s in ("p10", "p30", "p100")}
    images = {s: rows["vit_ti", s]["pretrain_images"] for s in ("p10", "p30", "p100")}
    train_images = json.loads((out / "08_reporting" / "pretrain_preprocess_report.json").read_text())[
        "train_images"
    ]
    # conf/tiny: 25%, 50% and all of the training images, the same for both models
    assert images == {
        "p10": round(0.25 * train_images),
        "p30": round(0.5 * train_images),
        "p100": train_images,
    }
    assert all(rows["bit_r26", s]["pretrain_images"] == n for s, n in images.items())
    resnet, vit = rows["bit_r26", "p100"], rows["vit_ti", "p100"]
    assert (resnet["architecture"], resnet["variant"], vit["architecture"]) == (
        "BiT ResNet",
        "R26x0.25",
        "ViT",
    )
    assert resnet["model_settings"] == {"image_size": 16, "variant": "R26x0.25"}  # no ViT field leaks in
    for (_, subset), row in rows.items():
        # epochs over the subset set the steps (conf/tiny: 1, 0.5, 0.25); compute = FLOPs per image x images seen
        assert row["epochs"] == {"p10": 1, "p30": 0.5, "p100": 0.25}[subset]
        assert row["steps"] == math.ceil(row["epochs"] * row["pretrain_images"] / 32)
        flops = row["training_flops_per_image"] * row["steps"] * row["global_batch_size"]
        assert row["pretrain_exaflops"] == pytest.approx(flops / 1e18)
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        for run in row["runs"]:
            assert set(run["finetune"]) == set(embedded.DOWNSTREAM_NAMES)
            assert set(run["fewshot"]) == {f"{n}_{k}shot" for n in embedded.DOWNSTREAM_NAMES for k in (5, 10)}
            assert all(0 <= v <= 1 for v in [run["minival_accuracy"], *run["finetune"].values()])
        accuracies = [r["minival_accuracy"] for r in row["runs"]]
        assert row["summary"]["minival_accuracy"]["mean"] == pytest.approx(sum(accuracies) / 2)
    gap = results["vit_minus_resnet"]["p10"]
    best = {m: rows[m, "p10"]["summary"]["fewshot/mean_10shot"]["mean"] for m in ("vit_ti", "bit_r26")}
    assert gap["fewshot/mean_10shot"] == pytest.approx(best["vit_ti"] - best["bit_r26"])
    with PIL.Image.open(newest(out / "08_reporting" / "scaling.png")) as figure:
        assert figure.size[0] > 1200  # three panels
    # a re-run trains nothing: every seed of every run is found finished and reported the same
    again = kedro(project, "run", "--env", "tiny", "--pipelines", "scaling")
    assert (again.stdout + again.stderr).count("finished earlier") == 12
    rerun = json.loads(newest(out / "08_reporting" / "scaling_results.json").read_text())
    assert [r["runs"] for r in rerun["rows"]] == [r["runs"] for r in results["rows"]]


def test_tiny_ablations_score_each_arm_per_seed_and_train_equal_arms_once(project):
    kedro(project, "run", "--env", "tiny", "--pipelines", "ablations")
    out = project / "data" / "tiny"
    results = json.loads(newest(out / "08_reporting" / "ablation_results.json").read_text())
    rows = {r["arm"]: r for r in results["rows"]}
    posembs = {rows[a]["model_settings"]["posemb"] for a in rows if a.startswith("posemb_")}
    assert posembs == {"none", "learn", "learn2d", "sincos2d"}
    heads = {(rows[a]["model_settings"]["pool"], rows[a]["lr"]) for a in rows if not a.startswith("posemb_")}
    assert heads == {("tok", 1e-3), ("gap", 1e-3), ("tok", 3e-4), ("gap", 3e-4)}
    assert all(r["steps"] == 4 for r in rows.values())  # conf/tiny: every arm the same schedule
    # the 1-D position embedding arm is the class-token arm at lr 1e-3: trained once, the same numbers
    assert rows["posemb_1d"]["runs"] == rows["token_lr_high"]["runs"]
    assert len(list((out / "06_models" / "ablations").glob("*/result.json"))) == 7 * 2
    posemb = results["groups"]["position embedding"]["fewshot/mean_10shot"]
    means = {
        rows[a]["label"]: rows[a]["summary"]["fewshot/mean_10shot"]["mean"] for a in rows if "posemb" in a
    }
    assert posemb["mean"] == pytest.approx(means) and posemb["best"] == max(means, key=means.get)
    with PIL.Image.open(newest(out / "08_reporting" / "ablations.png")) as figure:
        assert figure.size[0] > 1000


def test_tiny_drloc_experiment_trains_both_arms_per_seed_and_resumes_finished_runs(project):
    kedro(project, "run", "--env", "tiny", "--pipelines", "drloc")
    out = project / "data" / "tiny"
    results = json.loads(newest(out / "08_reporting" / "drloc_results.json").read_text())
    runs = results["runs"]
    assert [(r["seed"], r["drloc"]) for r in runs] == [(0, False), (0, True), (1, False), (1, True)]
    assert results["drloc"] == {"pairs": 4, "weight": 0.1, "mlp_dim": 16, "pool_grid": None}  # tiny over base
    for run in runs:
        assert 0 <= run["minival_accuracy"] <= 1 and len(run["curve"]) == 3  # 6 steps, logged every 2
        assert (run["final_drloc_loss"] is not None) == run["drloc"]
        assert ("drloc_loss" in run["curve"][-1]) == run["drloc"]
    summary = results["summary"]
    by = {(r["seed"], r["drloc"]): r["minival_accuracy"] for r in runs}
    assert summary["difference"]["per_seed"] == pytest.approx([by[s, True] - by[s, False] for s in (0, 1)])
    assert summary["with"]["values"] == [by[0, True], by[1, True]]
    with PIL.Image.open(newest(out / "08_reporting" / "drloc_comparison.png")) as figure:
        assert figure.size[0] > 900
    # every run left its final checkpoint: a re-run trains nothing and reports the same numbers
    assert len(list((out / "06_models" / "drloc" / "checkpoints").glob("*/step_0000006"))) == 4
    kedro(project, "run", "--env", "tiny", "--pipelines", "drloc")
    again = json.loads(newest(out / "08_reporting" / "drloc_results.json").read_text())
    assert [r["minival_accuracy"] for r in again["runs"]] == [r["minival_accuracy"] for r in runs]
    # By now every pipeline has run in this project: summary.md has each one's newest headline.
    summary = (out / "08_reporting" / "summary.md").read_text()
    sections = [line.removeprefix("## ") for line in summary.splitlines() if line.startswith("## ")]
    assert sections == [
        "dedup", "pretrain", "fewshot", "finetune", "vtab", "drloc", "scaling", "ablations", "analysis"
    ]  # fmt: skip
    assert "Not run yet" not in summary and f"with DRLoc {results['summary']['with']['mean']:.1%}" in summary


def test_tiny_masked_patch_pretraining_keeps_the_first_run_then_fine_tunes_as_usual(tmp_path):
    copy = copy_project(tmp_path / "mpp")
    kedro(copy, "run", "--env", "tiny", "--pipelines", "pretrain")
    masked = ("--params", "pretrain.train.objective=masked_patch")
    kedro(copy, "run", "--env", "tiny", "--pipelines", "pretrain", *masked)
    out = copy / "data" / "tiny"
    both = [
        json.loads(p.read_text()) for p in sorted((out / "08_reporting").glob("pretrain_metrics.json/*/*"))
    ]
    assert [m["objective"] for m in both] == [
        "classification",
        "masked_patch",
    ]  # the first run's result stays
    metrics = both[-1]
    assert metrics["num_classes"] == 512 and metrics["chance_accuracy"] == 1 / 512
    assert 0 <= metrics["minival_accuracy"] <= 1
    models = sorted((out / "06_models" / "pretrain").glob("*/model.safetensors"))
    assert [load_model(m.parent).config.num_classes for m in models] == [40, 512]
    tuning = kedro(copy, "run", "--env", "tiny", "--pipelines", "finetune")
    assert f"model of version {models[-1].parent.name}" in tuning.stdout + tuning.stderr  # the newest run's
    tuned = json.loads(newest(out / "08_reporting" / "finetune_metrics.json").read_text())
    assert set(tuned) == set(embedded.DOWNSTREAM_NAMES)
    assert all(0 <= r["test_accuracy"] <= 1 and r["num_classes"] < 512 for r in tuned.values())
