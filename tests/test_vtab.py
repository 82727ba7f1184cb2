"""VTAB-1k: the 800 / 200 / 1000 splits, the selection rule, BiT's augmentation exceptions, the registry, Hub-shaped
parquet sources, and a failing task that does not take the others down."""

import io
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vit_pipelines.evaluation.vtab import GROUPS, Task, select_setting, summarise, train_pp, vtab_splits
from vit_pipelines.models import VisionTransformer, ViTConfig
from vit_pipelines.pipelines.downstream import downstream_datasets, vtab_tasks
from vit_pipelines.pipelines.vtab import nodes

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = yaml.safe_load((ROOT / "conf" / "base" / "parameters_vtab.yml").read_text())["vtab"]
VTAB_1K = ["caltech101", "cifar100", "dtd", "flowers102", "pets", "sun397", "svhn", "camelyon", "eurosat", "resisc45",
           "retinopathy", "clevr_count", "clevr_dist", "dmlab", "dsprites_loc", "dsprites_ori", "kitti_dist",
           "smallnorb_azi", "smallnorb_elev"]  # fmt: skip


def numbered(n: int, offset: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"id": list(range(offset, offset + n)), "label": [i % 5 for i in range(n)]}
    )


def test_splits_have_800_200_and_1000_rows_disjoint_and_deterministic():
    train = numbered(1500)
    splits = vtab_splits(train, None, seed=0)
    ids = {name: set(ds["id"]) for name, ds in splits.items()}
    assert [len(splits[k]) for k in ("train800", "val200", "train800val200")] == [800, 200, 1000]
    assert not ids["train800"] & ids["val200"] and ids["train800val200"] == ids["train800"] | ids["val200"]
    assert {
        k: set(ds["id"]) for k, ds in vtab_splits(train, None, seed=0).items()
    } == ids  # same seed, same rows
    assert set(vtab_splits(train, None, seed=1)["train800"]["id"]) != ids["train800"]


def test_val200_comes_from_the_validation_split_when_there_is_one():
    splits = vtab_splits(numbered(900), numbered(400, offset=10_000), seed=0)
    assert len(splits["val200"]) == 200 and min(splits["val200"]["id"]) >= 10_000
    assert len(splits["train800"]) == 800 and max(splits["train800"]["id"]) < 900
    with pytest.raises(ValueError, match="the train split has 700 examples; VTAB-1k needs 1000"):
        vtab_splits(numbered(700), None, seed=0)


def test_one_setting_is_chosen_by_the_mean_over_tasks_not_per_task():
    settings = ["a", "b", "c"]
    scores = {
        "t1": {"a": 0.9, "b": 0.5, "c": 0.5},
        "t2": {"a": 0.1, "b": 0.6, "c": 0.4},
        "t3": {"a": 0.2, "b": 0.6},
    }
    # per task the best would be a, b, b; over the complete tasks t1, t2 the means are a 0.5, b 0.55, c 0.45
    assert select_setting(scores, settings) == "b"
    assert select_setting({"t": {"a": 0.5, "b": 0.5, "c": 0.1}}, settings) == "a"  # tie: earlier in the grid
    with pytest.raises(ValueError, match="no task finished"):
        select_setting({"t3": scores["t3"]}, settings)


def test_the_registry_has_the_19_tasks_in_their_groups_with_bits_augmentation_exceptions():
    tasks = {name: Task.from_params(name, spec) for name, spec in REGISTRY["tasks"].items()}
    assert set(VTAB_1K) <= set(tasks)
    groups = [tasks[n].group for n in VTAB_1K]
    assert [groups.count(g) for g in GROUPS] == [7, 4, 8]
    no_flip = {n for n in VTAB_1K if not tasks[n].flip}
    no_crop = {n for n in VTAB_1K if not tasks[n].crop}
    assert no_flip == {"dsprites_ori", "smallnorb_azi", "dsprites_loc"}
    assert no_crop == {"clevr_count", "clevr_dist", "dmlab", "kitti_dist", "dsprites_loc"}
    ops = REGISTRY["pp_train"]
    assert train_pp(tasks["cifar100"], 48, **ops) == "random_crop(48)|flip_lr|value_range(-1,1)"
    assert train_pp(tasks["dsprites_loc"], 48, **ops) == "central_crop(48)|value_range(-1,1)"
    assert train_pp(tasks["dsprites_ori"], 48, **ops) == "random_crop(48)|value_range(-1,1)"
    assert train_pp(tasks["clevr_count"], 48, **ops) == "central_crop(48)|flip_lr|value_range(-1,1)"
    # every task the default run uses, and only groups in the protocol
    assert {tasks[n].group for n in ("digits", "textures", "counting")} == set(GROUPS)
    with pytest.raises(ValueError, match="group must be one of"):
        Task.from_params("x", {"group": "other", "source": "embedded:digits"})


def hub_shaped_parquet(folder: Path, classes: int = 4) -> None:
    """Files like the clip-benchmark VTAB conversions: `__key__`, `webp` (encoded image), `cls`."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 24)):
        rows = {"__key__": [], "webp": [], "cls": []}
        for i in range(n):
            label = i % classes
            pixels = rng.integers(0, 40, (20, 20, 3), dtype=np.uint8)
            pixels[..., label % 3] += 60 * (1 + label // 3)  # the class is in the colour: learnable
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="WEBP")
            rows["__key__"].append(f"{i:05d}")
            rows["webp"].append({"bytes": buffer.getvalue(), "path": None})
            rows["cls"].append(label)
        features = datasets.Features(__key__=datasets.Value("string"), webp=datasets.Image(),
                                     cls=datasets.Value("int64"))  # fmt: skip
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}-00000.parquet"))


def test_hub_shaped_parquet_tasks_run_and_a_failing_task_is_reported_without_stopping_the_others(tmp_path):
    hub_shaped_parquet(tmp_path)
    params = {
        **REGISTRY, "image_size": 16, "pp_cache": "decode|resize(18)", "train_size": 40, "val_size": 10,
        "test_limit": None, "checkpoint_dir": str(tmp_path / "ckpt"),
        "settings": [{"lr": 0.01, "steps": 2}, {"lr": 0.03, "steps": 2}],
        "train": {**REGISTRY["train"], "batch_size": 8, "warmup_steps": 0, "log_every": 1, "mixed_precision": "no"},
        "eval": {"pp": "central_crop({size})|value_range(-1,1)", "batch_size": 32},
        "tasks": {
            "local": {"group": "natural", "source": f"parquet:{tmp_path}/{{split}}-*.parquet",
                      "image_column": "webp", "label_column": "cls", "num_classes": 4},
            "missing": {"group": "structured", "source": f"parquet:{tmp_path}/nothing/{{split}}.parquet",
                        "image_column": "webp", "label_column": "cls"},
        },
    }  # fmt: skip
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig.from_variant("Ti/4", image_size=16, depth=1, width=32, mlp_dim=64,
                                                     num_heads=2, num_classes=3))  # fmt: skip
    sweeps = {task: nodes.sweep_task(model, params, task=task) for task in params["tasks"]}
    assert set(sweeps["local"]["val200"]) == {"lr=0.01,steps=2", "lr=0.03,steps=2"}
    assert all(0.0 <= v <= 1.0 for v in sweeps["local"]["val200"].values())
    assert "FileNotFoundError" in sweeps["missing"]["error"]
    choice = nodes.choose_setting(params, **sweeps)
    assert choice["tasks"] == ["local"]
    results = {task: nodes.final_task(model, params, sweeps[task], choice, task=task) for task in sweeps}
    assert results["local"]["train_images"] == 50 and results["local"]["test_images"] == 24
    assert (
        0.0 <= results["local"]["test_accuracy"] <= 1.0 and results["local"]["setting"] == choice["setting"]
    )
    metrics, figure = nodes.report(params, choice, **results)
    assert metrics["finished"] == ["local"] and set(metrics["failed"]) == {"missing"}
    assert metrics["mean"] == metrics["group_mean"]["natural"] == results["local"]["test_accuracy"]
    assert summarise(results)["group_mean"].keys() == {"natural"}
    # every run kept its final checkpoint: a re-run finds them and trains nothing again
    finals = sorted((tmp_path / "ckpt" / "local").glob("*/*/step_*"))
    assert len(finals) == 3
    written = [f.stat().st_mtime_ns for f in finals]
    assert nodes.sweep_task(model, params, task="local") == sweeps["local"]
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "ckpt" / "local").glob("*/*/step_*"))] == written


def test_the_one_line_in_conf_local_switches_the_suite(tmp_path):
    for env in ("base", "local"):
        (tmp_path / env).mkdir()
    shutil.copy(ROOT / "conf" / "base" / "globals.yml", tmp_path / "base" / "globals.yml")
    assert vtab_tasks(tmp_path) == ["digits", "textures", "counting"]
    (tmp_path / "local" / "globals.yml").write_text("vtab_tasks: [" + ", ".join(VTAB_1K) + "]\n")
    assert vtab_tasks(tmp_path) == VTAB_1K and downstream_datasets(tmp_path) == [
        "digits",
        "textures",
        "counting",
    ]
    # the README's line is exactly that one
    readme_line = "vtab_tasks: [" + ", ".join(VTAB_1K) + "]"
    assert readme_line in (ROOT / "README.md").read_text()
