"""Bad input gives one clear error that says what to change, before any long work starts."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from kedro.io import DatasetError
from kedro_datasets.json import JSONDataset

import vit_pipelines.kedro_io as kedro_io
from vit_pipelines.data.cache import check_class_ids, classes_of
from vit_pipelines.data.sources import load_image_dataset
from vit_pipelines.evaluation.vtab import Task
from vit_pipelines.hooks import base_parameters, check_group_settings, check_known_keys
from vit_pipelines.locks import FolderLockedError, RunLock
from vit_pipelines.models import VisionTransformer, ViTConfig, load_pretrained
from vit_pipelines.models.fused_cpu import build_folder, wait_for_build_lock
from vit_pipelines.training.saving import load_model, save_model


@pytest.mark.parametrize("variant", ["X/16", "B16", "B/x"])
def test_unknown_variant_names_list_the_known_sizes(variant):
    with pytest.raises(
        ValueError, match=r"variant must look like 'B/16' with size in \['B', 'G', 'H', 'L', 'S', 'Ti', 'g'\]"
    ):
        ViTConfig.from_variant(variant)


def test_a_patch_size_that_does_not_divide_the_image_says_what_to_choose():
    with pytest.raises(
        ValueError, match=r"image_size \(32, 30\) is not divisible by patch_size \(4, 4\): choose"
    ):
        ViTConfig.from_variant("Ti/4", image_size=(32, 30))


def test_a_checkpoint_of_another_shape_names_the_mismatch(tmp_path):
    torch.manual_seed(0)
    save_model(
        VisionTransformer(ViTConfig.from_variant("Ti/4", image_size=16, depth=3, num_classes=5)), tmp_path
    )
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "depth": 2}))  # config and weights disagree
    with pytest.raises(
        ValueError,
        match=r"(?s)does not fit the model it describes .*use the config it was trained with.*blocks\.2",
    ):
        load_pretrained(tmp_path, format="native")


def test_a_dataset_without_the_configured_label_column_lists_its_columns():
    with pytest.raises(ValueError, match=r"has no column 'cls'; its columns are \['image', 'label'\]"):
        load_image_dataset("embedded:digits", split="test", label_column="cls")


def test_misspelt_settings_name_the_keys_that_exist():
    with pytest.raises(ValueError, match=r"unknown ViTConfig fields \['widht'\]; known: \[.*'width'"):
        ViTConfig.from_dict({**ViTConfig.from_variant("Ti/4", image_size=16).to_dict(), "widht": 8})
    with pytest.raises(ValueError, match=r"unknown keys of VTAB task 'x' \['flips'\]; known: \[.*'flip'"):
        Task.from_params("x", {"group": "natural", "source": "embedded:digits", "flips": False})


def test_a_rank_that_cannot_see_rank_0s_files_says_so(tmp_path, monkeypatch):
    rank_1 = SimpleNamespace(
        num_processes=2, process_index=1, is_main_process=False, wait_for_everyone=lambda: None
    )
    monkeypatch.setattr(kedro_io, "process_state", lambda: rank_1)
    catalog = kedro_io.RankAwareCatalog({"matches": JSONDataset(filepath=str(tmp_path / "matches.json"))})
    with pytest.raises(
        DatasetError, match=r"rank 1 cannot see 'matches' \(.*matches\.json.*\), which rank 0 wrote"
    ):
        catalog.save("matches", {"n": 1})  # rank 0's file is not on this node's disk
    (tmp_path / "matches.json").write_text(json.dumps({"n": 1}))  # now it is (shared storage)
    catalog.save("matches", {"n": 1})
    assert catalog.load("matches") == {"n": 1}


def test_one_run_per_data_folder_and_stale_locks_are_taken_over(tmp_path, caplog):
    with RunLock(tmp_path) as first:
        holder = json.loads(first.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(
            FolderLockedError, match=rf"another run is writing into .*: pid {os.getpid()} on "
        ):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".run.lock").exists()  # released
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / ".run.lock").write_text(
        json.dumps({**holder, "pid": int(gone.stdout)})
    )  # killed: its PID is free
    with RunLock(tmp_path), caplog.at_level("WARNING"):
        pass
    assert "removing a stale lock" in caplog.text and not (tmp_path / ".run.lock").exists()


def test_a_kernel_build_lock_left_by_a_killed_build_is_named_not_waited_on(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_KERNELS_DIR", str(tmp_path / "kernels"))
    folder = build_folder()
    assert (
        folder.parent == tmp_path / "kernels" and folder.name == build_folder().name
    )  # one per source and torch
    lock = folder / "lock"
    lock.touch()
    os.utime(lock, (time.time() - 3600,) * 2)  # a build killed an hour ago
    started = time.perf_counter()
    with pytest.raises(
        TimeoutError, match=rf"kernel build lock {lock} is 3\d\d\d s old, left by a killed build"
    ):
        wait_for_build_lock(folder)
    assert time.perf_counter() - started < 5
    lock.touch()  # a build in progress elsewhere: waited for until it ends
    threading.Timer(0.5, lock.unlink).start()
    wait_for_build_lock(folder, poll=0.1)
    assert not lock.exists()


@pytest.mark.parametrize(
    ("group", "override", "message"),
    [
        ("dedup", {"threshold": 2}, r"dedup.threshold is a cosine or correlation in \[-1, 1\], got 2"),
        ("dedup", {"batch_size": 0}, "dedup.batch_size must be a whole number >= 1, got 0"),
        ("dedup", {"stage1": "hnsw"}, "dedup.stage1 must be auto, exact or ivf, got 'hnsw'"),
        ("fewshot", {"shots": [0, 5]}, r"fewshot.shots must be a list of whole numbers >= 1, got \[0, 5\]"),
        ("fewshot", {"l2_reg": 0}, "l2_reg and l2_grid values must be > 0"),
        (
            "fewshot",
            {"max_train_per_class": 10},
            "max_train_per_class must be null or >= the most shots \\(25\\)",
        ),
        (
            "pretrain",
            {"fewshot": {"enabled": True, "shots": [5], "seeds": 0}},
            "pretrain.fewshot.seeds must be",
        ),
    ],
)
def test_dedup_and_fewshot_settings_are_range_checked_up_front(group, override, message):
    base = base_parameters(Path(__file__).parents[1] / "conf")[group]
    settings = {**base, **override}
    if group == "pretrain":
        settings["fewshot"] = {**base["fewshot"], **override["fewshot"]}
    with pytest.raises(ValueError, match=message):
        check_group_settings(group, settings)
    check_group_settings(group, base)  # the shipped settings pass


def test_an_unknown_pipeline_name_lists_the_pipelines():
    from vit_pipelines.cli import check_pipeline_name

    with pytest.raises(
        ValueError,
        match=r"there is no pipeline 'pretrian': did you mean 'pretrain'\? the pipelines are ablations, "
        r"analysis, dedup, drloc, fewshot, finetune, pretrain, scaling, vtab$",
    ):
        check_pipeline_name("pretrian")
    for name in ("pretrain", "vtab", "__default__", None):
        check_pipeline_name(name)


def test_misspelt_nested_parameters_are_refused_with_the_keys_that_exist():
    known = base_parameters(Path(__file__).resolve().parents[1] / "conf")
    check_known_keys(known, known, "")  # the base configuration itself
    fine = {"pretrain": {"model": {"width": 32, "num_heads": 2}}, "vtab": {"tasks": {"my_task": {}}}}
    check_known_keys(fine, known, "")  # model fields and new VTAB tasks are the user's to add
    for params, wrong in (
        ({"pretrain": {"trian": {"steps": 5}}}, "pretrain.trian"),
        ({"pretrain": {"data": {"minival_fractoin": 0.1}}}, "pretrain.data.minival_fractoin"),
        ({"finetune": {"train": {"stpes": 3}}}, "finetune.train.stpes"),
        ({"pretrian": {}}, "pretrian"),
    ):
        with pytest.raises(ValueError, match=rf"unknown parameters \['{re.escape(wrong)}'\]; known here: \["):
            check_known_keys(params, known, "")


def test_labels_that_are_not_class_ids_are_named_and_class_names_become_ids(tmp_path):
    assert classes_of(np.array([0, 2, 1, 2])) == 3 and classes_of(np.array([0, 2])) == 3
    stray = (
        r"4 distinct values \(0, 1, 2, 999\) would make a 1000-class head, mostly unused: map them to 0..3"
    )
    with pytest.raises(ValueError, match=stray):
        classes_of(np.array([0, 1, 2, 1, 999]))
    with pytest.raises(ValueError, match="labels must be class ids >= 0, found -1"):
        classes_of(np.array([-1, 0, 1]))
    with pytest.raises(
        ValueError, match=r"labels 5 are outside the label column's 2 class names \(cat, dog\)"
    ):
        check_class_ids(np.array([0, 5, 1]), datasets.ClassLabel(names=["cat", "dog"]))
    check_class_ids(np.array([0, 1, 1]), datasets.ClassLabel(names=["cat", "dog"]))
    images = [{"bytes": b"x", "path": None}] * 3
    names = datasets.Dataset.from_dict({"image": images, "label": ["dog", "cat", "dog"]})
    names.to_parquet(tmp_path / "pets.parquet")
    pets = load_image_dataset(f"parquet:{tmp_path}/pets.parquet")
    assert pets.features["label"].names == ["cat", "dog"] and pets["label"] == [1, 0, 1]
    with pytest.raises(
        ValueError, match=r"pets\.parquet: label column 'label' holds string; streamed sources need"
    ):
        load_image_dataset(f"parquet:{tmp_path}/pets.parquet", streaming=True)
    # the id → name mapping travels with the model, and a model without names leaves none behind
    model = VisionTransformer(ViTConfig(image_size=8, patch_size=4, width=8, depth=1, num_heads=1, mlp_dim=8,
                                        num_classes=2))  # fmt: skip
    model.class_names = pets.features["label"].names
    save_model(model, tmp_path / "model")
    assert load_model(tmp_path / "model").class_names == ["cat", "dog"]
    save_model(VisionTransformer(model.config), tmp_path / "model")
    assert not hasattr(load_model(tmp_path / "model"), "class_names")


def test_damaged_checkpoints_are_named(tmp_path):
    model = VisionTransformer(
        ViTConfig(image_size=8, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32)
    )
    save_model(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        ValueError, match=rf"cannot read {re.escape(str(weights))}: .*truncated or not a safetensors"
    ):
        load_pretrained(tmp_path)
    save_model(model, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'config.json'))} is not valid JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json beside the weights in"):
        load_pretrained(tmp_path)


def test_worker_pools_end_with_a_killed_run():
    # the pattern of the de-dup and cache pools: workers started with `die_with_parent`, the parent then killed
    parent = subprocess.Popen(
        [sys.executable, "-c", (
            "import concurrent.futures as cf, multiprocessing as mp, time\n"
            "from vit_pipelines.workers import die_with_parent\n"
            "pool = cf.ProcessPoolExecutor(2, mp.get_context('fork'), die_with_parent)\n"
            "futures = [pool.submit(time.sleep, 60) for _ in range(2)]\n"
            "time.sleep(1)\n"
            "print(*[p.pid for p in pool._processes.values()], flush=True)\n"
            "time.sleep(60)\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(workers) == 2
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(_running(pid) for pid in workers)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's exit status is left
