"""Tests for the embedded default data (vit_pipelines.data.embedded)."""

import hashlib
import inspect

import datasets
import numpy as np
import pytest
from PIL import Image

from vit_pipelines.data.embedded import (
    DEFAULT_PRETRAIN_IMAGES,
    DOWNSTREAM_NAMES,
    EMBEDDED_VERSION,
    LEAKS_PER_DOWNSTREAM,
    PRETRAIN_CLASS_NAMES,
    build_downstream,
    build_pretrain,
    leaked_copies,
    pretrain_labels,
)

SIZE = 32  # small images keep the tests fast; the code paths are the same as at 64
LEAK_BUILD = 3600  # pretraining size for the leak test: 3 leaked copies per downstream set
DOWNSTREAM_SIZES = {"digits": (1000, 797, 10), "textures": (1200, 600, 6), "counting": (1200, 600, 6)}


def raw_bytes(ds: datasets.Dataset) -> list[bytes]:
    return [x["bytes"] for x in ds.cast_column("image", datasets.Image(decode=False))["image"]]


def pixel_hashes(ds: datasets.Dataset) -> set[str]:
    return {hashlib.sha1(np.asarray(im).tobytes()).hexdigest() for im in ds["image"]}


def check_columns(ds: datasets.Dataset, num_classes: int, size: int) -> None:
    assert ds.column_names == ["image", "label"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].num_classes == num_classes
    assert all(name and not name.isspace() for name in ds.features["label"].names)
    labels = np.array(ds["label"])
    assert labels.min() >= 0 and labels.max() < num_classes
    for i in range(0, len(ds), max(1, len(ds) // 25)):
        img = ds[i]["image"]
        assert img.mode == "RGB" and img.size == (size, size)
    assert all(b.startswith(b"\x89PNG") for b in raw_bytes(ds.select(range(min(50, len(ds))))))


@pytest.fixture(scope="module")
def downstream() -> dict[str, datasets.DatasetDict]:
    return {name: build_downstream(name, image_size=SIZE) for name in DOWNSTREAM_NAMES}


@pytest.fixture(scope="module")
def pretrain_small() -> datasets.Dataset:
    return build_pretrain(num_images=300, image_size=SIZE)


def test_default_sizes_without_building():
    assert isinstance(EMBEDDED_VERSION, int)
    assert inspect.signature(build_pretrain).parameters["num_images"].default == DEFAULT_PRETRAIN_IMAGES
    assert DEFAULT_PRETRAIN_IMAGES >= 20_000
    assert len(PRETRAIN_CLASS_NAMES) >= 20 and len(set(PRETRAIN_CLASS_NAMES)) == len(PRETRAIN_CLASS_NAMES)
    labels = pretrain_labels(DEFAULT_PRETRAIN_IMAGES)
    counts = np.bincount(labels, minlength=len(PRETRAIN_CLASS_NAMES))
    assert len(labels) == DEFAULT_PRETRAIN_IMAGES and counts.max() - counts.min() <= 1
    leaks = leaked_copies()
    assert len(leaks) == LEAKS_PER_DOWNSTREAM * len(DOWNSTREAM_NAMES)
    assert len({leak["pretrain_index"] for leak in leaks}) == len(leaks)


def test_pretrain_small(pretrain_small):
    ds = pretrain_small
    assert len(ds) == 300
    check_columns(ds, len(PRETRAIN_CLASS_NAMES), SIZE)
    assert ds.features["label"].names == list(PRETRAIN_CLASS_NAMES)
    labels = np.array(ds["label"])
    assert (labels == pretrain_labels(300)).all()
    counts = np.bincount(labels, minlength=len(PRETRAIN_CLASS_NAMES))
    assert counts.max() - counts.min() <= 1
    assert len(pixel_hashes(ds)) == len(ds)  # no accidental repeats


def test_pretrain_deterministic(pretrain_small):
    assert raw_bytes(build_pretrain(num_images=300, image_size=SIZE)) == raw_bytes(pretrain_small)
    other = raw_bytes(build_pretrain(num_images=300, image_size=SIZE, seed=1))
    assert sum(a == b for a, b in zip(other, raw_bytes(pretrain_small), strict=True)) == 0


def test_pretrain_default_image_size():
    ds = build_pretrain(num_images=40)
    assert ds[0]["image"].size == (64, 64) and ds[0]["image"].mode == "RGB"


@pytest.mark.parametrize("name", DOWNSTREAM_NAMES)
def test_downstream(downstream, name):
    dd = downstream[name]
    assert set(dd) == {"train", "test"}
    n_train, n_test, k = DOWNSTREAM_SIZES[name]
    assert (len(dd["train"]), len(dd["test"])) == (n_train, n_test)
    for split in dd.values():
        check_columns(split, k, SIZE)
        counts = np.bincount(split["label"], minlength=k)
        assert counts.min() >= 0.8 * counts.max()  # balanced (digits: stratified, nearly balanced)
    assert dd["train"].features == dd["test"].features
    assert not pixel_hashes(dd["train"]) & pixel_hashes(dd["test"])


@pytest.mark.parametrize("name", DOWNSTREAM_NAMES)
def test_downstream_deterministic(downstream, name):
    again = build_downstream(name, image_size=SIZE)
    for split in ("train", "test"):
        assert raw_bytes(again[split]) == raw_bytes(downstream[name][split])
        assert again[split]["label"] == downstream[name][split]["label"]


def test_downstream_unknown_name():
    with pytest.raises(ValueError, match="unknown downstream"):
        build_downstream("imagenet")


def test_leaked_copies_plan():
    assert leaked_copies(50) == []
    for n in (100, 300, LEAK_BUILD, DEFAULT_PRETRAIN_IMAGES):
        leaks = leaked_copies(n)
        assert leaks == leaked_copies(n)
        per_set = {name: sum(leak["downstream"] == name for leak in leaks) for name in DOWNSTREAM_NAMES}
        expected = max(1, round(LEAKS_PER_DOWNSTREAM * n / DEFAULT_PRETRAIN_IMAGES))
        assert set(per_set.values()) == {expected}
        assert all(set(leak) == {"pretrain_index", "downstream", "test_index", "transform"} for leak in leaks)
        assert all(0 <= leak["pretrain_index"] < n for leak in leaks)
        assert all(0 <= leak["test_index"] < DOWNSTREAM_SIZES[leak["downstream"]][1] for leak in leaks)
        assert all("jpeg(q=" in leak["transform"] for leak in leaks)


def signature(img: Image.Image, n: int = 16, margin: float = 0.1) -> np.ndarray:
    """Unit-norm, zero-mean grayscale thumbnail of the central part (borders and crops mostly cut off)."""
    w = img.width
    box = (margin * w, margin * w, (1 - margin) * w, (1 - margin) * w)
    a = np.asarray(img.convert("L").resize((n, n), Image.BILINEAR, box=box), dtype=np.float64)
    a -= a.mean()
    return a / (np.linalg.norm(a) + 1e-9)


def test_leaked_copies_are_transformed_test_images(downstream):
    pretrain = build_pretrain(num_images=LEAK_BUILD, image_size=SIZE)
    leaks = leaked_copies(LEAK_BUILD)
    labels = pretrain_labels(LEAK_BUILD)
    for name in DOWNSTREAM_NAMES:
        test = np.stack([signature(im) for im in downstream[name]["test"]["image"]])
        for leak in (leak for leak in leaks if leak["downstream"] == name):
            row = pretrain[leak["pretrain_index"]]
            assert row["label"] == labels[leak["pretrain_index"]]  # keeps the slot's pretraining label
            q = signature(row["image"])
            corr = np.maximum((test * q).sum((1, 2)), (test[:, :, ::-1] * q).sum((1, 2)))  # flipped or not
            target = corr[leak["test_index"]]
            others = np.delete(corr, leak["test_index"])
            assert target > 0.7, leak
            assert (others >= target).sum() <= 3, leak  # near the top (sklearn digits has near-duplicates)
            assert target - np.median(others) > 0.3, leak
