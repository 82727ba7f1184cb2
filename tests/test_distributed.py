"""Data parallelism through `accelerate launch`: two gloo ranks on CPU against one process, end to end: both
ranks search their share of the de-dup queries and write their share of the image cache; training gives the
weights of one process, replicated (DDP) or sharded (FSDP), and sharded checkpoints resume on any number of
ranks."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_project, newest, run_in
from safetensors.torch import load_file

from vit_pipelines.models.checkpoints import newest_version

pytestmark = pytest.mark.slow

LAUNCH_TWO_RANKS = (
    "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
)  # fmt: skip
TINY_PRETRAIN = ("kedro", "run", "--env", "tiny", "--pipelines", "pretrain")


VERSION = re.compile(r"\d{4}-\d\d-\d\dT\d\d\.\d\d\.\d\d\.\d{3}Z")  # a Kedro save version


def files_under(root: Path) -> list[str]:
    """The files below `root`, each run's version folder named `<version>`; not the MLflow store, whose
    artifact folders are named by random run ids."""
    files = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
    return sorted(VERSION.sub("<version>", str(p)) for p in files if "09_tracking" not in p.parts)


def test_two_ranks_train_the_weights_of_one_process_and_write_the_same_files(tmp_path):
    one = copy_project(tmp_path / "one")
    two = copy_project(tmp_path / "two")
    run_in(one, *TINY_PRETRAIN)
    launched = run_in(two, *LAUNCH_TWO_RANKS, *TINY_PRETRAIN, env={"ACCELERATE_USE_CPU": "1"})
    assert launched.stderr.count("Pipeline execution completed") <= 1  # the other rank logs warnings only

    model = "data/tiny/06_models/pretrain"
    single, distributed = (load_file(newest_version(p / model) / "model.safetensors") for p in (one, two))
    assert single.keys() == distributed.keys()
    for name, weight in single.items():
        torch.testing.assert_close(distributed[name], weight, atol=1e-5, rtol=1e-5, msg=name)

    # The same files as one process; the cache's shards written by both ranks, byte for byte the same.
    assert files_under(two / "data") == files_under(one / "data")
    from mlflow.tracking import MlflowClient  # the main rank alone tracked the run: one MLflow run

    store = MlflowClient(f"sqlite:///{two / 'data' / 'tiny' / '09_tracking' / 'mlflow.db'}")
    runs = store.search_runs([store.get_experiment_by_name("vit-pipelines").experiment_id])
    assert [r.info.run_name for r in runs] == ["pretrain"]
    cache = "data/tiny/05_model_input/pretrain/train"
    manifest = json.loads((two / cache / "manifest.json").read_text())
    assert len(manifest["shards"]) > 2 and {s["rank"] for s in manifest["shards"]} == {0, 1}
    for shard in manifest["shards"]:
        assert (two / cache / shard["file"]).read_bytes() == (one / cache / shard["file"]).read_bytes()
    # De-dup: each rank searched its half of the queries; together, the matches of one process.
    found = [json.loads((p / "data/tiny/02_intermediate/dedup_matches.json").read_text()) for p in (one, two)]
    assert found[1]["matches"] == found[0]["matches"] and found[1]["unreadable"] == found[0]["unreadable"]
    reports = [json.loads((p / "data/tiny/08_reporting/dedup_report.json").read_text()) for p in (one, two)]
    assert reports[0]["queries_per_rank"] == [600] and reports[1]["queries_per_rank"] == [300, 300]
    # The final evaluation: each rank scored its contiguous share of minival; together, one process's number.
    metrics = [
        json.loads(newest(p / "data/tiny/08_reporting/pretrain_metrics.json").read_text()) for p in (one, two)
    ]
    assert metrics[1]["minival_accuracy"] == metrics[0]["minival_accuracy"]
    total = metrics[0]["minival_images"]
    assert metrics[0]["minival_images_per_rank"] == [total]
    assert metrics[1]["minival_images_per_rank"] == [total // 2, total - total // 2]
    assert metrics[1]["fewshot"] == metrics[0]["fewshot"]  # the probe's features: each rank extracted half
    # The logged loss and accuracy are reduced over both ranks' halves of each global batch.
    history = "data/tiny/07_model_output/pretrain_history.json"
    logs = [json.loads(newest(p / history).read_text())["records"] for p in (one, two)]
    for a, b in zip(*logs, strict=True):
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["accuracy"] == a["accuracy"]


def test_two_ranks_extract_half_of_the_features_each_and_both_get_all_of_them(tmp_path):
    from distributed_features import model_and_images

    from vit_pipelines.evaluation.features import extract_features

    script = Path(__file__).with_name("distributed_features.py")
    out = tmp_path / "features.npz"
    launch = [a for a in LAUNCH_TWO_RANKS if a != "-m"]
    run_in(tmp_path, *launch, str(script), str(out), env={"ACCELERATE_USE_CPU": "1"})
    model, cache = model_and_images()
    features, labels = extract_features(model, cache, "value_range(-1,1)", batch_size=16)
    with np.load(out) as two:
        assert two["per_rank"].tolist() == [50, 51]  # forward passes: each rank its contiguous half
        assert np.array_equal(two["labels"], labels)
        np.testing.assert_allclose(two["features"], features, atol=1e-5, rtol=1e-5)


def test_a_rank_that_dies_in_a_shared_stage_ends_the_others_naming_it(tmp_path):
    """Rank 1 fails in the middle of de-dup, before the matches are gathered: rank 0, waiting in the gather,
    is ended by the launcher within seconds, and the failing rank is named."""
    script = tmp_path / "dies.py"
    script.write_text(
        "from vit_pipelines.data import embedded\n"
        "from vit_pipelines.pipelines.dedup.nodes import find_duplicates\n"
        "from vit_pipelines.training.loop import process_state\n"
        "import vit_pipelines.pipelines.dedup.nodes as nodes\n"
        "search = nodes.search\n"
        "def failing(*args, **kwargs):\n"
        "    if process_state().process_index == 1:\n"
        "        raise RuntimeError('rank 1 lost its disk')\n"
        "    return search(*args, **kwargs)\n"
        "nodes.search = failing\n"
        "pretrain = embedded.build_pretrain(num_images=200)\n"
        "tests = {'digits': embedded.build_downstream('digits')['test'].select(range(50))}\n"
        "find_duplicates(pretrain, {'num_proc': 1}, **tests)\n"
    )
    launch = [a for a in LAUNCH_TWO_RANKS if a != "-m"]
    start = time.monotonic()
    result = subprocess.run(
        [*launch, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "KEDRO_DISABLE_TELEMETRY": "1"},
    )  # fmt: skip
    assert result.returncode != 0 and time.monotonic() - start < 120
    assert "rank 1 lost its disk" in result.stderr and re.search(r"rank\s*:\s*1", result.stderr), (
        result.stderr[-3000:]
    )


TRAINING = Path(__file__).with_name("distributed_training.py")


def train_tiny(
    folder: Path, sharding: str, checkpoints: Path, stop_after: int = 0, *flags: str, ranks: int = 2
):
    """`distributed_training.py` on `ranks` gloo ranks (or one plain process): its weights (the EMA's as
    `ema.*`) and its last evaluation. The fused CPU kernels stay off, so that sharded and unsharded
    evaluation run the same bf16 operations."""
    out = folder / f"{sharding}-{len(list(folder.glob('*.safetensors')))}.safetensors"
    args = [str(TRAINING), str(out), sharding, str(checkpoints), str(stop_after), *flags]
    command = [*[a for a in LAUNCH_TWO_RANKS if a != "-m"], *args] if ranks == 2 else [sys.executable, *args]
    run_in(folder, *command, env={"ACCELERATE_USE_CPU": "1", "VIT_FUSED_CPU": "0"})
    return load_file(out), json.loads(out.with_suffix(".json").read_text())


def assert_same_tensors(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=tol, rtol=tol, msg=name)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """An uninterrupted sharded run on two ranks, and its checkpoint folder."""
    folder = tmp_path_factory.mktemp("fsdp")
    weights, evaluation = train_tiny(folder, "fsdp", folder / "checkpoints")
    return weights, evaluation, folder / "checkpoints"


def test_ddp_and_fsdp_on_two_ranks_train_and_evaluate_as_one_process(tmp_path, fsdp_run):
    one = train_tiny(tmp_path, "none", tmp_path / "one", ranks=1)
    ddp = train_tiny(tmp_path, "ddp", tmp_path / "ddp")
    fsdp, fsdp_checkpoints = fsdp_run[:2], fsdp_run[2]
    for weights, evaluation in (ddp, fsdp):  # weights, EMA, minival accuracy and features
        assert_same_tensors(one[0], weights, 1e-5)
        assert evaluation["minival_accuracy"] == one[1]["minival_accuracy"]
        assert evaluation["features_rows"] == 33  # shares of 16 and 17 rows: 2 and 3 batches of 8
        assert evaluation["features_sum"] == pytest.approx(one[1]["features_sum"], rel=1e-5)
    # Every rank wrote its shards of each checkpoint; nothing holds the whole model.
    step = next(fsdp_checkpoints.glob("*/step_0000006"))
    assert sorted(p.name for p in (step / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(step.rglob("*.safetensors"))


def test_a_sharded_checkpoint_resumes_on_two_ranks_and_on_one_and_consolidates(tmp_path, fsdp_run):
    uninterrupted = fsdp_run[0]
    killed = tmp_path / "killed"
    train_tiny(tmp_path, "fsdp", killed, 3)  # checkpoints at step 2; "killed" after step 3
    shutil.copytree(killed, tmp_path / "copy")
    # Two ranks, with activation checkpointing now (how a run executes, not what it trains): the same weights.
    resumed, _ = train_tiny(tmp_path, "fsdp", killed, 0, "--recompute")
    assert_same_tensors(uninterrupted, resumed, 0.0)
    # One process, unsharded, from the shards two ranks wrote.
    alone, _ = train_tiny(tmp_path, "none", tmp_path / "copy", ranks=1)
    assert_same_tensors(uninterrupted, alone, 1e-5)
    # The last checkpoint as a plain model folder.
    step = next(killed.glob("*/step_0000006"))
    subprocess.run(
        [sys.executable, "-m", "vit_pipelines.training.sharding", str(step), str(tmp_path / "model")],
        check=True,
    )
    consolidated = load_file(tmp_path / "model" / "model.safetensors")
    assert_same_tensors({k: v for k, v in resumed.items() if not k.startswith("ema.")}, consolidated, 0.0)


def test_an_unsharded_checkpoint_resumes_sharded(tmp_path, fsdp_run):
    train_tiny(tmp_path, "ddp", tmp_path / "run", 3)  # full weights, optimiser and EMA at step 2
    resumed, _ = train_tiny(tmp_path, "fsdp", tmp_path / "run")
    assert_same_tensors(fsdp_run[0], resumed, 0.0)


def test_two_ranks_run_a_study_as_one_process_does(tmp_path):
    """The scaling study's run on two ranks: each trains on half of every batch and scores half of every
    evaluation; the stored result is the one process's, and a re-run on two ranks skips it on both."""
    projects = [copy_project(tmp_path / name) for name in ("one", "two")]
    for project in projects:  # one model on one subset, to keep the test short
        with (project / "conf" / "tiny" / "globals.yml").open("a") as globals_file:
            globals_file.write("scaling_models: [bit_r26]\nscaling_subsets: [p100]\n")
    # float32 SGD at a small lr: Adam, or SGD at lr 0.1, turns rounding-level gradient differences into
    # visible ones within a few steps (weight standardisation divides the gradients by the kernels' std)
    sgd = "pretrain.train.mixed_precision=no,pretrain.train.optimizer=sgd,pretrain.train.lr=0.01"
    study = ("kedro", "run", "--env", "tiny", "--pipelines", "scaling", "--params", sgd)
    run_in(projects[0], *study)
    run_in(projects[1], *LAUNCH_TWO_RANKS, *study, env={"ACCELERATE_USE_CPU": "1"})
    results = [
        json.loads(newest(p / "data/tiny/08_reporting/scaling_results.json").read_text())["rows"]
        for p in projects
    ]
    assert [len(r) for r in results] == [1, 1]
    single, distributed = results[0][0], results[1][0]
    for key in ("steps", "pretrain_images", "pretrain_exaflops"):
        assert distributed[key] == single[key]
    assert [r["seed"] for r in distributed["runs"]] == [0, 1]
    # each seed's final pretraining checkpoint: the weights of one process (GroupNorm has no batch statistics)
    runs = "data/tiny/06_models/scaling"
    finals = sorted(
        p.relative_to(projects[0] / runs) for p in (projects[0] / runs).glob("*/checkpoints/*/step_*")
    )
    assert len(finals) == 2
    for final in finals:
        one, two = (load_file(p / runs / final / "model.safetensors") for p in projects)
        for name, weight in one.items():
            torch.testing.assert_close(two[name], weight, atol=1e-4, rtol=1e-4, msg=name)
    again = run_in(projects[1], *LAUNCH_TWO_RANKS, *study, env={"ACCELERATE_USE_CPU": "1"})
    # both ranks skip the finished seeds together (the main rank logs them); nothing trains
    assert (again.stdout + again.stderr).count("finished earlier") == 2
    assert "training R26x0.25" not in again.stdout + again.stderr
