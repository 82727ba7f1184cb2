"""Data parallelism through `accelerate launch`: two gloo ranks on CPU against one process, end to end: both
ranks write their share of the image cache; training gives the weights of one process."""

import json
from pathlib import Path

import pytest
import torch
from conftest import copy_project, run_in
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

LAUNCH_TWO_RANKS = (
    "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
)  # fmt: skip
TINY_PRETRAIN = ("kedro", "run", "--env", "tiny", "--pipeline", "pretrain")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_two_ranks_train_the_weights_of_one_process_and_write_the_same_files(tmp_path):
    one = copy_project(tmp_path / "one")
    two = copy_project(tmp_path / "two")
    run_in(one, *TINY_PRETRAIN)
    launched = run_in(two, *LAUNCH_TWO_RANKS, *TINY_PRETRAIN, env={"ACCELERATE_USE_CPU": "1"})
    assert launched.stderr.count("Pipeline execution completed") <= 1  # the other rank logs warnings only

    model = "data/tiny/06_models/pretrain/model.safetensors"
    single, distributed = load_file(one / model), load_file(two / model)
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
    # The logged loss and accuracy are reduced over both ranks' halves of each global batch.
    history = "data/tiny/07_model_output/pretrain_history.json"
    logs = [json.loads((p / history).read_text())["records"] for p in (one, two)]
    for a, b in zip(*logs, strict=True):
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["accuracy"] == a["accuracy"]
