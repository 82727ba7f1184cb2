"""Checkpoints by name: `hf:<repo id>`, `timm:<model name>` and fsspec URLs, read from a Hugging Face cache laid
out as the hub client writes it (blobs, snapshots, refs) and from fsspec's `memory://` and `file://` filesystems,
offline: nothing leaves this machine."""

import hashlib
import io
import json
import os
from pathlib import Path

import fsspec
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from test_checkpoints import ATOL, assert_same_logits, hf_config, images, randomized, small, to_npz, to_timm

from vit_pipelines.models import hub, load_pretrained
from vit_pipelines.training.saving import save_model


def cache_repo(cache: Path, repo: str, files: dict[str, bytes]) -> str:
    """`files` as huggingface_hub caches a download of `repo` at `main`: content-addressed blobs, a snapshot
    of links to them, and `refs/main` naming the snapshot's commit. Returns the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for name, content in files.items():
        blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, used as `HF_HUB_CACHE` with `HF_HUB_OFFLINE=1`; fsspec downloads cached beside it."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "CACHE", tmp_path / "fetched")
    return cache


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_hf_name_loads_from_the_cache_with_the_hf_logits(tmp_path, offline_hub):
    from transformers import ViTForImageClassification

    source = randomized(ViTForImageClassification(hf_config()))
    source.save_pretrained(tmp_path / "saved")
    commit = cache_repo(offline_hub, "google/vit-tiny-test", folder_files(tmp_path / "saved"))
    assert_same_logits(load_pretrained("hf:google/vit-tiny-test"), source, images(), atol=ATOL)
    assert_same_logits(load_pretrained(f"hf:google/vit-tiny-test@{commit}"), source, images(), atol=ATOL)
    # An older repository with torch weights only (pytorch_model.bin)
    older = io.BytesIO()
    torch.save(source.state_dict(), older)
    config = (tmp_path / "saved" / "config.json").read_bytes()
    cache_repo(
        offline_hub, "google/vit-older", {"config.json": config, "pytorch_model.bin": older.getvalue()}
    )
    assert_same_logits(load_pretrained("hf:google/vit-older"), source, images(), atol=ATOL)


def test_a_timm_name_loads_timm_weights_from_the_hub_cache(offline_hub):
    source = small()
    config = {"architecture": "vit_tiny_patch8_32", "num_classes": 5, "pretrained_cfg": {"tag": "test"}}
    files = {
        "model.safetensors": _safetensors_bytes(to_timm(source)),
        "config.json": json.dumps(config).encode(),
    }
    cache_repo(offline_hub, "timm/vit_tiny_patch8_32.test", files)
    ours = load_pretrained("timm:vit_tiny_patch8_32.test", num_heads=4)
    assert ours.config == source.config.replace(variant=None)
    assert_same_logits(ours, source, images())


def test_fsspec_urls_load_once_and_then_from_the_local_copy(tmp_path, offline_hub):
    source = small()
    memory = fsspec.filesystem("memory")
    with memory.open("/bucket/ViT-Ti_8.npz", "wb") as f:
        np.savez(f, **to_npz(source))
    url = "memory://bucket/ViT-Ti_8.npz"
    assert_same_logits(load_pretrained(url), source, images(), atol=1e-5)
    memory.rm("/bucket/ViT-Ti_8.npz")  # the remote copy gone (or the network): the cached one serves
    assert_same_logits(load_pretrained(url), source, images(), atol=1e-5)
    # A folder URL (this project's model folder), and a local file:// URL.
    save_model(source, tmp_path / "model")
    memory.put(str(tmp_path / "model"), "/bucket/model", recursive=True)
    assert_same_logits(load_pretrained("memory://bucket/model"), source, images())
    assert_same_logits(load_pretrained(f"file://{tmp_path / 'model'}"), source, images())


def test_bad_names_fail_in_one_line_naming_them(tmp_path, offline_hub):
    with pytest.raises(
        FileNotFoundError, match=r"hf:nobody/nothing is not in the local cache .* run once online"
    ):
        load_pretrained("hf:nobody/nothing")
    config = {"model_type": "bert", "hidden_size": 64}
    cache_repo(offline_hub, "google/bert-tiny", {"config.json": json.dumps(config).encode(),
                                                 "model.safetensors": _safetensors_bytes(to_timm(small()))})  # fmt: skip
    with pytest.raises(ValueError, match=r"holds a 'bert' model, not a Vision Transformer"):
        load_pretrained("hf:google/bert-tiny")
    memory = fsspec.filesystem("memory")
    memory.pipe("/bucket/notes.txt", b"not a checkpoint")
    with pytest.raises(ValueError, match=r"notes.txt: not a safetensors, npz or torch weights file"):
        load_pretrained("memory://bucket/notes.txt")
    with pytest.raises(FileNotFoundError, match=r"memory://bucket/missing.npz: no checkpoint file or folder"):
        load_pretrained("memory://bucket/missing.npz")


def _safetensors_bytes(tensors) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def test_a_pipelines_checkpoint_path_takes_a_name(tmp_path, offline_hub):
    from transformers import ViTForImageClassification

    from vit_pipelines.pipelines.downstream import start_model

    source = randomized(ViTForImageClassification(hf_config()))
    source.save_pretrained(tmp_path / "saved")
    cache_repo(offline_hub, "google/vit-tiny-test", folder_files(tmp_path / "saved"))
    params = {"checkpoint": {"path": "hf:google/vit-tiny-test", "format": "auto"}}
    model = start_model(None, params, pipeline="fewshot", features_only=True)  # as the fewshot pipeline does
    assert_same_logits(model, source, images(), atol=ATOL)
