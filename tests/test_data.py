"""Preprocessing ops on known inputs, the Arrow cache with bad images, data sources and batch samplers."""

import io

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from vit_pipelines.data.cache import cache_images, num_classes, split_minival
from vit_pipelines.data.loader import CachedImages, StepBatchSampler, eval_batches, train_loader
from vit_pipelines.data.ops import PP_OPS, BadImageError, build_pp, parse_pp
from vit_pipelines.data.sources import load_image_dataset

RNG = np.random.default_rng(0)


def ramp(h: int = 4, w: int = 6) -> torch.Tensor:
    """uint8 [3, h, w] whose value at (r, c) is 10*r + c in every channel."""
    grid = torch.arange(h)[:, None] * 10 + torch.arange(w)[None]
    return grid.to(torch.uint8).expand(3, h, w).clone()


def png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image = PIL.Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


def test_parse_pp_reads_python_literals():
    assert parse_pp("decode|inception_crop(32)|flip_lr|value_range(-1,1)") == [
        ("decode", (), {}),
        ("inception_crop", (32,), {}),
        ("flip_lr", (), {}),
        ("value_range", (-1, 1), {}),
    ]
    assert parse_pp(" resize((16, 24)) | inception_crop(8, area_min=50) ") == [
        ("resize", ((16, 24),), {}),
        ("inception_crop", (8,), {"area_min": 50}),
    ]
    with pytest.raises(ValueError, match="unknown pp op 'blur'"):
        parse_pp("decode|blur(3)")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_pp("resize(x)")
    assert {"to_rgb", "resize", "resize_small", "central_crop", "random_crop", "inception_crop", "flip_lr",
            "value_range", "decode"} <= set(PP_OPS)  # fmt: skip


def test_value_range_maps_0_255_to_minus_one_one():
    out = build_pp("value_range(-1,1)")(torch.tensor([[[0, 51, 255]]], dtype=torch.uint8), RNG)
    torch.testing.assert_close(out, torch.tensor([[[-1.0, -0.6, 1.0]]]))
    assert out.dtype == torch.float32


def test_central_and_random_crop_take_the_right_pixels():
    image = ramp(4, 6)
    out = build_pp("central_crop(2)")(image, RNG)
    torch.testing.assert_close(out[0], torch.tensor([[12, 13], [22, 23]], dtype=torch.uint8))
    for seed in range(20):
        crop = build_pp("random_crop((2, 3))")(image, np.random.default_rng(seed))
        top, left = divmod(int(crop[0, 0, 0]), 10)
        torch.testing.assert_close(crop, image[:, top : top + 2, left : left + 3])
    with pytest.raises(ValueError, match="at least"):
        build_pp("central_crop(8)")(image, RNG)


def test_flip_lr_mirrors_with_probability_p():
    image = ramp(2, 3)
    torch.testing.assert_close(build_pp("flip_lr(1.0)")(image, RNG), image.flip(-1))
    torch.testing.assert_close(build_pp("flip_lr(0.0)")(image, RNG), image)
    flips = sum(
        bool((build_pp("flip_lr")(image, np.random.default_rng(s)) != image).any()) for s in range(400)
    )
    assert 160 < flips < 240


def test_resize_and_resize_small_sizes_and_values():
    flat = torch.full((3, 10, 20), 77, dtype=torch.uint8)
    assert build_pp("resize(8)")(flat, RNG).shape == (3, 8, 8)
    out = build_pp("resize_small(5)")(flat, RNG)
    assert out.shape == (3, 5, 10) and out.dtype == torch.uint8 and bool((out == 77).all())
    # Antialiased bilinear resizing agrees with PIL's reference implementation to one grey level.
    array = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    ours = build_pp("resize((8, 12))")(torch.from_numpy(array).permute(2, 0, 1), RNG).permute(1, 2, 0).numpy()
    pil = np.asarray(PIL.Image.fromarray(array).resize((12, 8), PIL.Image.BILINEAR))
    assert np.abs(ours.astype(int) - pil.astype(int)).max() <= 1


def test_inception_crop_area_and_aspect_ranges():
    image = ramp(40, 40)
    op = build_pp("inception_crop(10, area_min=20, area_max=50)")
    for seed in range(30):
        out = op(image, np.random.default_rng(seed))
        assert out.shape == (3, 10, 10)
    # With the resize disabled by a matching size we can measure the crop: ask for the full area.
    full = build_pp("inception_crop(40, area_min=100, area_max=100)")
    for seed in range(10):
        out = full(image, np.random.default_rng(seed))
        assert out.shape == (3, 40, 40)


def test_to_rgb_expands_grayscale_and_drops_alpha():
    op = build_pp("to_rgb")
    assert op(torch.zeros(1, 2, 2), RNG).shape == (3, 2, 2)
    assert op(torch.zeros(4, 2, 2), RNG).shape == (3, 2, 2)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_decode_converts_every_mode_to_rgb(mode):
    array = (np.arange(8 * 8 * 3) % 256).astype(np.uint8).reshape(8, 8, 3)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    out = build_pp("decode")(png(array, mode, fmt), RNG)
    assert out.shape == (3, 8, 8) and out.dtype == torch.uint8


@pytest.mark.parametrize(
    ("value", "reason"),
    [(b"", "empty"), (None, "empty"), (b"not an image", "corrupt"), ("tiny", "too_small")],
)
def test_decode_rejects_bad_inputs_with_a_reason(value, reason):
    if value == "tiny":
        value = png(np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(BadImageError) as err:
        build_pp("decode")(value, RNG)
    assert err.value.reason == reason


def make_raw(arrays_or_bytes: list, labels: list[int]) -> datasets.Dataset:
    images = [{"bytes": b if isinstance(b, bytes) else png(b), "path": None} for b in arrays_or_bytes]
    features = datasets.Features(image=datasets.Image(decode=False), label=datasets.ClassLabel(num_classes=3))
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_cache_converts_or_skips_bad_images_and_reports_counts():
    good = np.full((12, 12, 3), 100, np.uint8)
    truncated = png(good)[:40]
    raw = make_raw(
        [good, good, png(good, "L"), png(good, "RGBA"), png(good, "CMYK", "JPEG"), b"", truncated,
         png(np.zeros((2, 2, 3), np.uint8)), good],
        [0, 1, 2, 0, 1, 2, 0, 1, 2],
    )  # fmt: skip
    cache, report = cache_images(raw, "decode|resize(8)")
    assert len(cache) == 6
    assert report["images_in"] == 9 and report["images_kept"] == 6
    assert report["skipped"] == {"corrupt": 1, "empty": 1, "too_small": 1}
    assert report["converted_to_rgb"] == {"CMYK": 1, "L": 1, "RGBA": 1}
    assert cache.with_format("numpy")[:]["image"].shape == (6, 8, 8, 3)
    assert cache["label"] == [0, 1, 2, 0, 1, 2]
    assert num_classes(cache) == 3


def test_cache_needs_a_fixed_output_size():
    raw = make_raw([np.zeros((12, 12, 3), np.uint8), np.zeros((12, 20, 3), np.uint8)], [0, 1])
    with pytest.raises(ValueError, match="fixed size"):
        cache_images(raw, "decode|resize_small(8)")
    with pytest.raises(ValueError, match="start with 'decode'"):
        cache_images(raw, "resize(8)")


def test_minival_split_is_stratified_and_disjoint():
    raw = make_raw([np.full((8, 8, 3), i, np.uint8) for i in range(60)], [i % 3 for i in range(60)])
    cache, _ = cache_images(raw, "decode")
    train, minival = split_minival(cache, 0.1, seed=0)
    assert len(train) == 54 and len(minival) == 6
    assert sorted(minival["label"]) == [0, 0, 1, 1, 2, 2]
    pixels = lambda d: {int(x[0, 0, 0]) for x in d.with_format("numpy")[:]["image"]}  # noqa: E731
    assert not pixels(train) & pixels(minival) and len(pixels(train) | pixels(minival)) == 60


def test_step_batches_cover_each_epoch_once_and_resume_identically():
    sampler = list(StepBatchSampler(10, 4, num_batches=5, seed=3))
    positions = [pos for batch in sampler for _, pos in batch]
    assert positions == list(range(20))
    first_epoch = [i for batch in sampler for i, pos in batch if pos < 10]
    assert sorted(first_epoch) == list(range(10))
    resumed = list(StepBatchSampler(10, 4, num_batches=2, seed=3, start_batch=3))
    assert resumed == sampler[3:5]
    assert list(StepBatchSampler(10, 4, num_batches=5, seed=4)) != sampler


def test_train_loader_batches_are_augmented_reproducibly():
    raw = make_raw([np.full((8, 8, 3), i, np.uint8) for i in range(16)], [i % 3 for i in range(16)])
    cache, _ = cache_images(raw, "decode")
    pp = "inception_crop(6)|flip_lr|value_range(-1,1)"
    loader = train_loader(cache, pp, batch_size=4, num_batches=6, seed=1)
    a = [b["images"] for b in loader]
    b = [b["images"] for b in train_loader(cache, pp, batch_size=4, num_batches=3, seed=1, start_batch=3)]
    assert a[0].shape == (4, 3, 6, 6) and a[0].dtype == torch.uint8  # value_range waits for the device
    for x, y in zip(a[3:], b, strict=True):
        torch.testing.assert_close(x, y)
    scaled = loader.dataset.on_device(a[0])
    assert scaled.dtype == torch.float32 and scaled.min() >= -1 and scaled.max() <= 1
    torch.testing.assert_close(scaled, a[0].float() / 127.5 - 1)
    evaluated = list(eval_batches(cache, "value_range(0,1)", batch_size=5))
    assert [len(e["labels"]) for e in evaluated] == [5, 5, 5, 1]
    assert evaluated[0]["images"].dtype == torch.float32 and evaluated[0]["images"].max() <= 1


def test_loader_reads_the_rows_datasets_would_give(tmp_path):
    """Zero-copy reads across Arrow chunks and through a split's row mapping, in this process and in workers."""
    raw = make_raw([np.full((8, 8, 3), i, np.uint8) for i in range(40)], [i % 3 for i in range(40)])
    cache, _ = cache_images(raw, "decode|resize(4)")
    chunked = cache.flatten_indices(cache_file_name=str(tmp_path / "flat.arrow"), writer_batch_size=16)
    assert chunked.data.column("image").num_chunks == 3  # 16 + 16 + 8 rows, memory-mapped
    train, _ = split_minival(chunked, 0.25, seed=0)
    assert train._indices is not None  # logical rows map to others in the table
    rows = [29, 0, 5, 5, 12, 1]
    expected = train.with_format("numpy")[rows]
    images, labels = CachedImages(train, "value_range(0,1)").rows(rows)
    np.testing.assert_array_equal(images, expected["image"])
    np.testing.assert_array_equal(labels, expected["label"])
    # two workers read the same batches as the main process
    batches = [train_loader(train, "random_crop(3)", 4, 5, seed=2, num_workers=w) for w in (0, 2)]
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def test_sources_read_parquet_arrow_and_imagefolder(tmp_path):
    arrays = [np.full((10, 10, 3), 20 * i, np.uint8) for i in range(6)]
    labels = [0, 1, 2, 0, 1, 2]
    table = datasets.Dataset.from_dict(
        {"img": [{"bytes": png(a), "path": None} for a in arrays], "cls": labels},
        features=datasets.Features(img=datasets.Image(), cls=datasets.Value("int64")),
    )
    table.to_parquet(str(tmp_path / "part-0.parquet"))
    from_parquet = load_image_dataset(f"parquet:{tmp_path}/*.parquet", image_column="img", label_column="cls")
    assert from_parquet.column_names == ["image", "label"] and from_parquet["label"] == labels

    table.save_to_disk(str(tmp_path / "arrow"))
    from_arrow = load_image_dataset(
        f"arrow:{tmp_path}/arrow", image_column="img", label_column="cls", limit=4
    )
    assert len(from_arrow) == 4

    for i, a in enumerate(arrays):
        folder = tmp_path / "folder" / "train" / f"class_{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(a).save(folder / f"{i}.png")
    from_folder = load_image_dataset(f"imagefolder:{tmp_path}/folder", split="train")
    assert len(from_folder) == 6 and sorted(set(from_folder["label"])) == [0, 1, 2]
    cache, report = cache_images(from_folder, "decode|resize(4)")
    assert report["images_kept"] == 6


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        load_image_dataset("cifar100")
    with pytest.raises(FileNotFoundError):
        load_image_dataset(f"parquet:{tmp_path}/missing/*.parquet")
    with pytest.raises(ValueError, match="unknown embedded set"):
        load_image_dataset("embedded:imagenet")
