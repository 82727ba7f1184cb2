"""Data parallelism through `accelerate launch`: two gloo ranks on CPU against one process, end to end: both
ranks search their share of the de-dup queries and write their share of the image cache; training gives the
weights of one process."""

import json
import os
import re
import subprocess
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
    """The files below `root`, each run's version folder named `<version>`."""
    return sorted(VERSION.sub("<version>", str(p.relative_to(root))) for p in root.rglob("*") if p.is_file())


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
