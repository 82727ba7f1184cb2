"""Bad input gives one clear error that says what to change, before any long work starts."""

import json
from types import SimpleNamespace

import pytest
import torch
from kedro.io import DatasetError
from kedro_datasets.json import JSONDataset

import vit_pipelines.kedro_io as kedro_io
from vit_pipelines.data.sources import load_image_dataset
from vit_pipelines.evaluation.vtab import Task
from vit_pipelines.models import VisionTransformer, ViTConfig, load_pretrained
from vit_pipelines.training.checkpoint import save_model


@pytest.mark.parametrize("variant", ["X/16", "B16", "B/x"])
def test_unknown_variant_names_list_the_known_sizes(variant):
    with pytest.raises(
        ValueError, match=r"variant must look like 'B/16' with size in \['B', 'H', 'L', 'S', 'Ti'\]"
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
