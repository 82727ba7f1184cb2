"""The image cache: encoded and pixels storage, bounded shards written alike by any number of processes,
resumed builds, bad images counted by reason, and the loader's decode-in-workers path."""

import io
import multiprocessing

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from skimage import data as photos

from vit_pipelines.data.cache import ShardBuild, open_shards, read_manifest, split_rows
from vit_pipelines.data.loader import CachedImages, train_loader
from vit_pipelines.data.ops import build_pp

RNG = np.random.default_rng(0)


def encoded(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **options) -> bytes:
    image = PIL.Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """A crop of a real photo (scikit-image's astronaut), so JPEG sizes and decoding are realistic."""
    full = photos.astronaut()
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, full.shape[0] - h), rng.integers(0, full.shape[1] - w)
    return np.ascontiguousarray(full[top : top + h, left : left + w])


def source(values: list, paths: list | None = None) -> datasets.Dataset:
    paths = paths or [None] * len(values)
    features = datasets.Features(image=datasets.Image(decode=False), label=datasets.ClassLabel(num_classes=3))
    rows = [{"bytes": v, "path": p} for v, p in zip(values, paths, strict=True)]
    return datasets.Dataset.from_dict({"image": rows, "label": [i % 3 for i in range(len(values))]}, features)


def test_encoded_storage_keeps_the_bytes_and_counts_bad_images_by_reason(tmp_path):
    good = photo()
    values = [
        encoded(good, "JPEG", quality=90),
        encoded(good, "PNG"),
        encoded(good, "WEBP"),
        encoded(good, "BMP"),  # re-encoded as PNG, losslessly
        encoded(good, "JPEG", mode="CMYK"),
        encoded(good, "PNG", mode="P"),
        encoded((good[..., 0].astype(np.uint16) * 257), "PNG"),  # 16-bit grey
        b"",
        encoded(good, "JPEG")[:600],  # truncated
        b"GIF89a not really",
    ]
    paths = [f"img{i}.x" for i in range(len(values))]
    manifest = ShardBuild(source(values, paths), np.arange(len(values)), "encoded").write(tmp_path / "c")
    assert manifest["images_in"] == 10 and manifest["images_kept"] == 7
    assert manifest["skipped"] == {"corrupt": 2, "empty": 1}
    assert manifest["skipped_examples"] == {
        "corrupt": ["row 8 (img8.x)", "row 9 (img9.x)"],
        "empty": ["row 7 (img7.x)"],
    }
    assert manifest["formats"] == {"BMP": 1, "JPEG": 2, "PNG": 3, "WEBP": 1}
    assert manifest["reencoded_as_png"] == {"BMP": 1}
    cache = open_shards(tmp_path / "c")
    assert cache["source_index"] == [0, 1, 2, 3, 4, 5, 6] and cache["label"] == [0, 1, 2, 0, 1, 2, 0]
    stored = cache["image"]
    for i in (0, 1, 2, 4, 5, 6):
        assert stored[i] == values[i]  # as they came, byte for byte
    bmp = PIL.Image.open(io.BytesIO(stored[3]))
    assert bmp.format == "PNG" and np.array_equal(np.asarray(bmp), good)
    # the loader decodes every mode to uint8 RGB in its workers
    images = CachedImages(cache, "central_crop(64)").__getitems__([(i, i) for i in range(7)])["images"]
    assert images.shape == (7, 3, 64, 64) and images.dtype == torch.uint8
    assert manifest["bytes_over_source"] <= 1.1


def test_pixels_storage_holds_the_decoded_fixed_size_arrays(tmp_path):
    values = [encoded(photo(seed=s), "PNG") for s in range(6)]
    build = ShardBuild(source(values), np.array([5, 0, 3]), "pixels", "decode|resize(8)")
    build.write(tmp_path / "c")
    cache = open_shards(tmp_path / "c")
    expected = [build_pp("decode|resize(8)")(values[i], RNG).permute(1, 2, 0).numpy() for i in (5, 0, 3)]
    np.testing.assert_array_equal(cache.with_format("numpy")["image"], np.stack(expected))
    assert cache["source_index"] == [5, 0, 3]
    with pytest.raises(ValueError, match="pp starting with 'decode'"):
        ShardBuild(source(values), np.arange(6), "pixels", "resize(8)")
    with pytest.raises(ValueError, match="storage must be one of"):
        ShardBuild(source(values), np.arange(6), "jpeg")


def _rank(build: ShardBuild, *args) -> None:
    torch.set_num_threads(1)  # forked from a process whose OpenMP pool a fork cannot use
    build.write(*args)


def build_with_ranks(build: ShardBuild, folder, world: int) -> None:
    """`world` ranks as processes meeting at a real barrier, as `accelerate launch` ranks would."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(world, timeout=120)
    ranks = [
        context.Process(target=_rank, args=(build, folder, r, world, barrier.wait)) for r in range(world)
    ]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=180)
    assert [rank.exitcode for rank in ranks] == [0] * world


@pytest.mark.parametrize("storage", ["encoded", "pixels"])
def test_shards_are_bounded_and_identical_whatever_the_processes(tmp_path, storage):
    values = [encoded(photo(60, 80, seed=s), "JPEG") for s in range(40)]
    values[7] = b""
    rows = np.random.default_rng(1).permutation(40)[:33]
    pp = "decode|resize(32)" if storage == "pixels" else None
    bound = 6 * (len(values[0]) if storage == "encoded" else 32 * 32 * 3 * 2)

    def build(num_proc: int) -> ShardBuild:
        return ShardBuild(source(values), rows, storage, pp, shard_bytes=bound, num_proc=num_proc)

    build(1).write(tmp_path / "one")
    build(2).write(tmp_path / "procs")
    build_with_ranks(build(1), tmp_path / "ranks", world=2)
    build_with_ranks(build(2), tmp_path / "both", world=2)
    one = read_manifest(tmp_path / "one")
    assert len(one["shards"]) == build(1).num_shards >= 5 and one["images_kept"] == 33 - (7 in rows)
    assert sorted({s["rank"] for s in read_manifest(tmp_path / "ranks")["shards"]}) == [0, 1]
    for other in ("procs", "ranks", "both"):
        manifest = read_manifest(tmp_path / other)
        assert [(s["file"], s["rows"]) for s in manifest["shards"]] == [
            (s["file"], s["rows"]) for s in one["shards"]
        ]
        for shard in one["shards"]:
            a, b = (tmp_path / name / shard["file"] for name in ("one", other))
            assert a.read_bytes() == b.read_bytes(), (other, shard["file"])
    cache = open_shards(tmp_path / "one")
    assert cache["source_index"] == [int(r) for r in rows if r != 7]  # the order asked for
    assert max(s["bytes"] for s in one["shards"]) < 1.5 * bound


def test_an_interrupted_build_keeps_its_finished_shards(tmp_path, monkeypatch):
    values = [encoded(photo(40, 50, seed=s), "PNG") for s in range(12)]
    build = ShardBuild(source(values), np.arange(12), "encoded", shard_bytes=2 * len(values[0]))
    written = []
    original = ShardBuild.write_shard

    def crash_on_shard_3(self, index, folder, rank=0):
        if index == 3:
            raise KeyboardInterrupt
        written.append(index)
        return original(self, index, folder, rank)

    monkeypatch.setattr(ShardBuild, "write_shard", crash_on_shard_3)
    with pytest.raises(KeyboardInterrupt):
        build.write(tmp_path / "c")
    assert not (tmp_path / "c").exists() and written == [0, 1, 2] and build.num_shards > 4
    monkeypatch.setattr(
        ShardBuild, "write_shard", lambda self, i, f, r=0: written.append(i) or original(self, i, f, r)
    )
    build.write(tmp_path / "c")
    assert written == list(range(build.num_shards)) and not (tmp_path / "c.partial").exists()
    ShardBuild(source(values), np.arange(12), "encoded", shard_bytes=2 * len(values[0])).write(tmp_path / "d")
    for shard in read_manifest(tmp_path / "c")["shards"]:
        assert (tmp_path / "c" / shard["file"]).read_bytes() == (tmp_path / "d" / shard["file"]).read_bytes()


def test_an_unreadable_shard_is_named(tmp_path):
    values = [encoded(photo(seed=s), "PNG") for s in range(3)]
    ShardBuild(source(values), np.arange(3), "encoded").write(tmp_path / "c")
    (tmp_path / "c" / "shard-00000.arrow").write_bytes(b"garbage")
    with pytest.raises(OSError, match=r"cannot read cache shard .*shard-00000\.arrow"):
        open_shards(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no image cache"):
        open_shards(tmp_path / "missing")


def test_workers_decode_the_same_batches_as_the_main_process(tmp_path):
    values = [encoded(photo(60, 80, seed=s), "JPEG") for s in range(16)]
    ShardBuild(source(values), np.arange(16), "encoded").write(tmp_path / "c")
    cache = open_shards(tmp_path / "c")
    pp = "inception_crop(24)|flip_lr|value_range(-1,1)"
    batches = [list(train_loader(cache, pp, 8, 4, seed=3, num_workers=w)) for w in (0, 2)]
    for a, b in zip(*batches, strict=True):
        assert a["images"].dtype == torch.uint8 and a["images"].shape == (8, 3, 24, 24)
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def test_decoding_only_as_far_as_the_crop_needs_gives_the_full_decode_crop():
    """`decode|inception_crop` runs fused: a JPEG decoded at the DCT scale the crop needs (PIL `draft`)
    matches the crop of the fully decoded image, resized by the unfused torch path, to a few grey levels."""
    big = PIL.Image.fromarray(photos.astronaut()).resize((1024, 1024), PIL.Image.BICUBIC)
    value = encoded(np.asarray(big), "JPEG", quality=95)
    fused, plain = build_pp("decode|inception_crop(64)"), build_pp("decode")
    unfused = build_pp("inception_crop(64)")
    for seed in range(6):
        a = fused(value, np.random.default_rng(seed)).float()
        b = unfused(plain(value, RNG), np.random.default_rng(seed)).float()
        assert a.shape == b.shape == (3, 64, 64)
        assert (a - b).abs().mean() < 4.0, seed  # the same crop; resamplers differ by a few levels


def test_split_rows_is_stratified_exact_and_disjoint():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    train, held = split_rows(labels, 0.1, seed=0)
    assert len(held) == 10 and sorted(np.bincount(labels[held])) == [2, 3, 5]
    assert not set(train) & set(held) and len(train) + len(held) == 100
    again, _ = split_rows(labels, 0.1, seed=0)
    assert np.array_equal(train, again) and not np.array_equal(split_rows(labels, 0.1, seed=1)[1], held)


def test_an_image_that_fails_in_a_worker_is_replaced_by_the_next_row(caplog):
    good = [encoded(photo(seed=s), "JPEG") for s in range(3)]
    features = datasets.Features(image=datasets.Value("binary"), label=datasets.Value("int64"))
    cache = datasets.Dataset.from_dict({"image": [good[0], b"broken", good[2]], "label": [0, 1, 2]}, features)
    batch = CachedImages(cache, "central_crop(32)").__getitems__([(0, 0), (1, 1), (2, 2)])
    assert batch["labels"].tolist() == [0, 2, 2] and batch["images"].shape == (3, 3, 32, 32)
    assert torch.equal(batch["images"][1], batch["images"][2])
    assert "row 1 of the cache cannot be decoded" in caplog.text


def test_the_same_build_is_not_written_twice(tmp_path, monkeypatch):
    values = [encoded(photo(seed=s), "PNG") for s in range(4)]
    ShardBuild(source(values), np.arange(4), "encoded").write(tmp_path / "c")
    monkeypatch.setattr(ShardBuild, "write_shard", lambda *a: pytest.fail("rewrote an identical cache"))
    assert ShardBuild(source(values), np.arange(4), "encoded").write(tmp_path / "c")["images_kept"] == 4
    monkeypatch.undo()
    assert ShardBuild(source(values), np.arange(3), "encoded").write(tmp_path / "c")["images_kept"] == 3
    assert len(open_shards(tmp_path / "c")) == 3


def test_a_rank_that_cannot_see_rank_0s_folder_stops_with_a_clear_message(tmp_path):
    values = [encoded(photo(seed=s), "PNG") for s in range(4)]
    build = ShardBuild(source(values), np.arange(4), "encoded", shard_bytes=2 * len(values[0]))
    with pytest.raises(FileNotFoundError, match="rank 1 cannot see .*storage that every node mounts"):
        build.write(tmp_path / "c", rank=1, world=2)  # rank 0 ran on another machine's disk


def test_auto_workers_and_build_processes_follow_the_cores(monkeypatch):
    from vit_pipelines.data import cache, loader

    for module in (cache, loader):
        monkeypatch.setattr(module, "usable_cores", lambda: 32)
    assert loader.resolve_num_workers("auto", "cuda", processes=4) == 7  # 8 cores a rank, one for the rank
    assert loader.resolve_num_workers("auto", "cuda", processes=1) == 16  # at most 16
    assert loader.resolve_num_workers("auto", "cpu", processes=1) == 8  # the step computes on the same cores
    assert loader.resolve_num_workers("auto", "cpu", processes=8) == 0
    assert loader.resolve_num_workers(3, "cpu") == 3 and cache.resolve_num_proc("auto", processes=4) == 8
    with pytest.raises(ValueError, match="num_workers must be"):
        loader.resolve_num_workers(-1)
    with pytest.raises(ValueError, match="num_proc must be"):
        cache.resolve_num_proc(0)
