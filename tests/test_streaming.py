"""Streamed sources: parquet, Arrow and webdataset shards read where they live (local paths, `file://` and
`memory://` URLs), indexed once, fed to the cache build and de-dup without a copy of the whole set."""

import io
import json
import os
import tarfile

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pytest
from test_cache import encoded, photo

from vit_pipelines.data.cache import ShardBuild, label_array, open_shards
from vit_pipelines.data.sources import load_image_dataset
from vit_pipelines.data.streaming import StreamedImages, expand_urls, open_streamed, read_all
from vit_pipelines.dedup import DedupConfig, build_index, search

ROWS, CLASSES = 40, 5
PARTS = [(0, 14), (14, 28), (28, 40)]  # rows of each shard


@pytest.fixture(scope="module")
def images() -> tuple[list[bytes], list[int]]:
    """Real-photo crops of several sizes as JPEG and PNG, labels cycling through the classes."""
    values = [
        encoded(photo(24 + i, 32 + i % 7, seed=i), "PNG" if i % 4 == 0 else "JPEG", quality=90)
        for i in range(ROWS)
    ]
    return values, [i % CLASSES for i in range(ROWS)]


def hf_dataset(values: list[bytes], labels: list[int]) -> datasets.Dataset:
    features = datasets.Features(
        image=datasets.Image(decode=False), label=datasets.ClassLabel(names=list("abcde"))
    )
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": v, "path": None} for v in values], "label": labels}, features
    )


def write_tar(f, values: list[bytes], labels: list[int], first: int, label_ext: str = "cls") -> None:
    with tarfile.open(fileobj=f, mode="w") as tar:
        for j, (value, label) in enumerate(zip(values, labels, strict=True), first):
            ext = "png" if value.startswith(b"\x89PNG") else "jpg"
            for name, data in ((f"s{j:05d}.{ext}", value), (f"s{j:05d}.{label_ext}", str(label).encode())):
                info = tarfile.TarInfo(f"train/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_shards(root: str, kind: str, values: list[bytes], labels: list[int]) -> str:
    """The set as `kind` shards under the fsspec folder `root`; returns the source's location."""
    fs, folder = fsspec.core.url_to_fs(root)
    fs.makedirs(folder, exist_ok=True)
    ds = hf_dataset(values, labels)
    for i, (a, b) in enumerate(PARTS):
        if kind == "parquet":  # row groups of 4 rows: reads are by row group
            with fs.open(f"{folder}/train-{i:05d}.parquet", "wb") as f:
                ds.select(range(a, b)).to_parquet(f, batch_size=4)
        elif kind == "webdataset":
            with fs.open(f"{folder}/train-{i:06d}.tar", "wb") as f:
                write_tar(f, values[a:b], labels[a:b], a)
        else:  # Arrow streams, as `save_to_disk` writes them
            table = ds.select(range(a, b)).flatten_indices().data.table
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            fs.pipe(f"{folder}/data-{i:05d}-of-00003.arrow", sink.getvalue().to_pybytes())
    pattern = {"parquet": "train-*.parquet", "webdataset": "train-{000000..000002}.tar", "arrow": ""}[kind]
    return f"{root.rstrip('/')}/{pattern}".rstrip("/")


LOCATIONS = {
    "local": lambda tmp: str(tmp),
    "file": lambda tmp: f"file://{tmp}",
    "memory": lambda tmp: f"memory://{tmp.name}",
}


@pytest.mark.parametrize("where", sorted(LOCATIONS))
@pytest.mark.parametrize("kind", ["parquet", "webdataset", "arrow"])
def test_every_format_streams_from_paths_and_fsspec_urls(kind, where, images, tmp_path):
    values, labels = images
    location = write_shards(LOCATIONS[where](tmp_path / "src"), kind, values, labels)
    source = open_streamed(kind, location, index_dir=tmp_path / "index")
    assert len(source) == ROWS and source.part_offsets.tolist() == [0, 14, 28, 40]
    assert source.labels().tolist() == labels and label_array(source).tolist() == labels
    expected = datasets.ClassLabel(names=list("abcde")) if kind != "webdataset" else datasets.Value("int64")
    assert source.features["label"] == expected  # HF's class names survive in parquet and Arrow
    assert [v["bytes"] for v in source[:]["image"]] == values
    picked = source[[39, 3, 15, 3, 0]]  # any order, repeats: each part read once, in order
    assert [v["bytes"] for v in picked["image"]] == [values[i] for i in (39, 3, 15, 3, 0)]
    assert picked["label"] == [labels[i] for i in (39, 3, 15, 3, 0)]
    assert source[17]["image"]["bytes"] == values[17] and source[17]["label"] == labels[17]
    head = source.head(20)
    assert len(head) == 20 and head.labels().tolist() == labels[:20] and len(head.parts) == 2
    assert [v["bytes"] for v in head[10:20]["image"]] == values[10:20]
    # without `streaming` a (small, downstream) set is read into memory as a Dataset
    if (
        "://" in location or kind == "webdataset"
    ):  # (local parquet and Arrow folders: `datasets`' own loaders)
        small = load_image_dataset(f"{kind}:{location}", index_dir=tmp_path / "index")
        assert isinstance(small, datasets.Dataset) and small["label"] == labels


def test_sequential_shards_are_indexed_once_shared_by_ranks_and_again_when_they_change(images, tmp_path):
    values, labels = images
    location = write_shards(str(tmp_path / "src"), "webdataset", values, labels)
    index = tmp_path / "index"
    open_streamed("webdataset", location, index_dir=index, rank=1, world=2)  # rank 1's share: part 1 …
    # … and, its barrier passed without rank 0, the parts rank 0 did not write
    assert len(list(index.glob("*.npy"))) == 3
    first = open_streamed("webdataset", location, index_dir=index)
    rewritten = list(reversed(labels[14:28]))
    changed = tmp_path / "src" / "train-000001.tar"
    with open(changed, "wb") as f:
        write_tar(f, values[14:28], rewritten, 14)
    os.utime(
        changed, (changed.stat().st_atime, changed.stat().st_mtime + 60)
    )  # the same size: a later mtime tells
    again = open_streamed("webdataset", location, index_dir=index)
    assert again.labels().tolist() == labels[:14] + rewritten + labels[28:]
    assert again.fingerprint != first.fingerprint and len(list(index.glob("*.npy"))) == 4


def test_the_cache_built_from_a_stream_equals_the_one_built_from_the_dataset(images, tmp_path):
    values, labels = images
    rows = np.array([i for i in range(ROWS) if i % 9 != 4])  # a de-dup filter over the source
    reference = ShardBuild(hf_dataset(values, labels), rows, "encoded", shard_bytes=1 << 30)
    reference.write(tmp_path / "from-dataset")
    expected = open_shards(tmp_path / "from-dataset")
    for kind, seekable in (("webdataset", False), ("parquet", True)):
        location = write_shards(f"memory://{kind}", kind, values, labels)
        stream = open_streamed(kind, location, index_dir=tmp_path / "index")
        manifests = []
        for workers in (1, 2):
            folder = tmp_path / f"{kind}-{workers}"
            manifests.append(
                ShardBuild(stream, rows, "encoded", shard_bytes=4000, num_proc=workers).write(folder)
            )
            cache = open_shards(folder)
            for column in ("image", "label", "source_index"):
                assert cache[column] == expected[column], (kind, column)
        files = [[(s["file"], s["rows"], s["bytes"]) for s in m["shards"]] for m in manifests]
        assert files[0] == files[1]  # 1 or 2 worker processes: the same shards
        bounds = np.cumsum([0] + [s["rows"] for s in manifests[0]["shards"]])
        parts = np.searchsorted([14, 28], rows[bounds[:-1]], side="right")
        ends = np.searchsorted([14, 28], rows[bounds[1:] - 1], side="right")
        assert (parts == ends).all()  # no cache shard spans two source shards
        if seekable:  # parquet is read by row group: shards cut at `shard_bytes` inside a part as well
            assert len(manifests[0]["shards"]) > 3
        else:  # a tar is read front to back: one cache shard per part
            assert len(manifests[0]["shards"]) == 3


def test_dedup_over_a_stream_finds_what_it_finds_over_the_dataset(images, tmp_path):
    values, labels = images
    references = [values[5], values[20], values[33], encoded(photo(64, 64, seed=99))]
    index, _ = build_index(references)
    location = write_shards(str(tmp_path / "src"), "webdataset", values, labels)
    stream = open_streamed("webdataset", location, index_dir=tmp_path / "index")
    found = {}
    for name, queries, workers in (
        ("dataset", hf_dataset(values, labels), 1),
        ("stream", stream, 1),
        ("stream, 2 workers", stream, 2),
    ):
        result = search(queries, index, DedupConfig(batch_size=8, num_proc=workers), progress=False)
        found[name] = [(m.query, m.reference, round(m.score, 6)) for m in result.matches]
    assert {q for q, _, _ in found["dataset"]} >= {5, 20, 33}
    assert found["stream"] == found["dataset"] == found["stream, 2 workers"]
    # two ranks: rank r takes source shards r, r + 2, … and reads each once
    shares = [search(stream, index, DedupConfig(batch_size=8), False, rank, 2) for rank in (0, 1)]
    assert [s.queries for s in shares] == [14 + 12, 14]
    joined = sorted((m for s in shares for m in s.matches), key=lambda m: m.query)
    assert [(m.query, m.reference, round(m.score, 6)) for m in joined] == found["dataset"]


def test_bad_sources_fail_in_one_line_naming_the_shard(images, tmp_path):
    values, labels = images
    with pytest.raises(FileNotFoundError, match="no files at"):
        open_streamed("parquet", f"file://{tmp_path}/missing-*.parquet")
    with pytest.raises(ValueError, match="streamed sources are"):
        open_streamed("csv", str(tmp_path))
    location = write_shards(str(tmp_path / "pq"), "parquet", values, labels)
    with pytest.raises(ValueError, match=r"has no column 'img'; its columns are \['image', 'label'\]"):
        open_streamed("parquet", location, image_column="img")
    (tmp_path / "pq" / "train-00001.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(OSError, match=r"cannot read source shard file://.*train-00001\.parquet"):
        open_streamed("parquet", location)
    unlabelled = tmp_path / "wds" / "train-000000.tar"
    unlabelled.parent.mkdir()
    with open(unlabelled, "wb") as f:
        write_tar(f, values[:3], labels[:3], 0, label_ext="txt")
    with pytest.raises(OSError, match=r"train-000000\.tar: sample 'train/s00000' has no \.cls member"):
        open_streamed("webdataset", str(unlabelled), index_dir=tmp_path / "index")
    truncated = tmp_path / "wds" / "train-000001.tar"
    with open(truncated, "wb") as f:
        write_tar(f, values[:3], labels[:3], 0)
    truncated.write_bytes(truncated.read_bytes()[:1500])
    with pytest.raises(OSError, match=r"cannot read source shard .*train-000001\.tar"):
        open_streamed("webdataset", str(truncated), index_dir=tmp_path / "index")


def test_brace_ranges_lists_and_folders_expand_in_order(tmp_path):
    for name in ("a-08.tar", "a-09.tar", "a-10.tar", "b-1.tar", "note.txt"):
        (tmp_path / name).write_bytes(b"x")
    names = lambda urls: [u.rsplit("/", 1)[-1] for u in urls]  # noqa: E731
    assert names(expand_urls(f"{tmp_path}/a-{{08..10}}.tar")) == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert names(expand_urls(f"file://{tmp_path}/{{a-09,b-1}}.tar")) == ["a-09.tar", "b-1.tar"]
    assert names(expand_urls(str(tmp_path), ".tar")) == ["a-08.tar", "a-09.tar", "a-10.tar", "b-1.tar"]


def test_the_catalog_source_streams_and_substitutes_the_split(images, tmp_path):
    values, labels = images
    write_shards(f"memory://{tmp_path.name}-train", "parquet", values, labels)
    stream = load_image_dataset(
        f"parquet:memory://{tmp_path.name}-{{split}}/*.parquet", "train", streaming=True, limit=30
    )
    assert isinstance(stream, StreamedImages) and len(stream) == 30
    assert read_all(stream)["label"] == labels[:30]
    json.dumps(stream.fingerprint)  # a plain string: part of the cache key
