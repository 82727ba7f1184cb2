"""Image sources read shard by shard where they live: parquet files, Arrow files and webdataset tar shards, at
local paths or fsspec URLs (`s3://`, `gs://`, `hf://`, `file://`, `memory://`, …), never copied whole.

`StreamedImages` numbers the rows of all shards ("parts") in order and fetches the rows asked for by reading
only the parts that hold them: parquet by row group, tar and Arrow streams front to back with a cursor, so
rows asked for in order cost one pass. An index pass finds each part's rows and labels: a parquet footer and
label column, or one read of a tar / Arrow stream (kept under `index_dir`, shared by the ranks).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from vit_pipelines.workers import writer_id

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a webdataset sample's image: the first of these it has
INDEX_THREADS = 16  # parts indexed at once: the index pass waits on storage, not on the CPU


def expand_urls(pattern: str, suffix: str = "") -> list[str]:
    """`pattern`'s files in order: braces first (`{000..099}` ranges, `{a,b}` lists), then fsspec globs; a
    folder stands for its files ending in `suffix`."""
    urls = []
    for each in _expand_braces(pattern):
        fs, _, paths = fsspec.core.get_fs_token_paths(each)
        for path in sorted(paths):
            inside = sorted(f for f in fs.find(path) if f.endswith(suffix)) if fs.isdir(path) else [path]
            urls += [fs.unstrip_protocol(f) for f in inside]
    if not urls:
        raise FileNotFoundError(f"no files at {pattern!r}")
    return urls


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [url for choice in choices for url in _expand_braces(head + choice + tail)]


# ------------------------------------------------------------------------------------------------ parts
class Part:
    """One shard of a source: its rows' labels, and its rows' `(image, label)` by position (ascending)."""

    seekable = False  # rows can be read without reading the ones before them

    def __init__(self, url: str, image_column: str, label_column: str) -> None:
        self.url, self.image_column, self.label_column = url, image_column, label_column
        self._cursor: tuple[int, Iterator, int] | None = None  # (pid, records, position of the next record)

    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.records()], np.int64)

    def records(self) -> Iterator[tuple[dict[str, Any], int]]:
        raise NotImplementedError

    def read(self, rows: Sequence[int]) -> list[tuple[dict[str, Any], int]]:
        """Rows `rows` (ascending) of this part, continuing the last read where they come after it."""
        out = []
        for row in rows:
            pid, records, position = self._cursor or (-1, iter(()), 0)
            if pid != os.getpid() or row < position:  # a forked worker or a step back: start again
                records, position = self.records(), 0
            for _ in range(row - position):
                next(records)
            out.append(next(records))
            self._cursor = (os.getpid(), records, row + 1)
        return out

    def fail(self, err: Exception) -> OSError:
        return OSError(f"cannot read source shard {self.url}: {err}")


class ParquetPart(Part):
    """Rows of a parquet file; the image column holds bytes or a `{"bytes", "path"}` struct (HF's layout)."""

    seekable = True

    def __init__(self, url: str, image_column: str, label_column: str) -> None:
        super().__init__(url, image_column, label_column)
        self._open: tuple[int, pq.ParquetFile, np.ndarray] | None = None  # (pid, file, row group starts)
        self._group: tuple[int, list, list] | None = None  # (row group, images, labels) last read

    def _file(self) -> pq.ParquetFile:
        return pq.ParquetFile(fsspec.open(self.url, "rb").open())

    def schema(self) -> pa.Schema:
        try:
            return self._file().schema_arrow
        except Exception as err:  # pyarrow raises several kinds on a damaged file
            raise self.fail(err) from err

    def labels(self) -> np.ndarray:
        try:
            table = self._file().read(columns=[self.label_column])
        except Exception as err:
            raise self.fail(err) from err
        return table.column(0).to_numpy(zero_copy_only=False).astype(np.int64)

    def read(self, rows: Sequence[int]) -> list[tuple[dict[str, Any], int]]:
        try:
            if self._open is None or self._open[0] != os.getpid():  # a forked worker opens its own
                file = self._file()
                sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
                self._open, self._group = (os.getpid(), file, np.cumsum([0, *sizes])), None
            _, file, starts = self._open
            out = []
            for row in rows:
                group = int(np.searchsorted(starts, row, side="right") - 1)
                if self._group is None or self._group[0] != group:
                    table = file.read_row_group(group, columns=[self.image_column, self.label_column])
                    self._group = (group, *(table.column(i).to_pylist() for i in range(2)))
                _, images, labels = self._group
                at = row - starts[group]
                out.append((_image_value(images[at], self.url), labels[at]))
        except Exception as err:
            raise self.fail(err) from err
        return out


class ArrowPart(Part):
    """Rows of an Arrow IPC file or stream (what `Dataset.save_to_disk` writes), read front to back."""

    def records(self) -> Iterator[tuple[dict[str, Any], int]]:
        try:
            with fsspec.open(self.url, "rb") as f:
                reader = _arrow_reader(f)
                for batch in reader:
                    images = batch.column(self.image_column).to_pylist()
                    labels = batch.column(self.label_column).to_pylist()
                    for image, label in zip(images, labels, strict=True):
                        yield _image_value(image, self.url), label
        except (OSError, pa.ArrowInvalid) as err:
            raise self.fail(err) from err

    def schema(self) -> pa.Schema:
        try:
            with fsspec.open(self.url, "rb") as f:
                return _arrow_reader(f).schema
        except (OSError, pa.ArrowInvalid) as err:
            raise self.fail(err) from err


def _arrow_reader(f: Any) -> Iterator[pa.RecordBatch]:
    try:
        return pa.ipc.open_stream(f)
    except pa.ArrowInvalid:  # the file format: footer-indexed batches
        f.seek(0)
        file = pa.ipc.open_file(f)
        reader = (file.get_batch(i) for i in range(file.num_record_batches))
        return _WithSchema(reader, file.schema)


class _WithSchema:
    def __init__(self, batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> None:
        self.batches, self.schema = batches, schema

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return self.batches


class TarPart(Part):
    """Samples of a webdataset tar shard: members `<key>.<ext>` grouped by key, in order; the image is the
    `image_column` member (`jpg`/`jpeg`/`png`/`webp`: whichever the sample has), the label the integer text
    of the `label_column` member (`cls`)."""

    def records(self) -> Iterator[tuple[dict[str, Any], int]]:
        try:
            with fsspec.open(self.url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                key, sample = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name.rsplit("/", 1)[-1]
                    stem, _, ext = name.partition(".")
                    prefix = member.name[: len(member.name) - len(name)] + stem
                    if prefix != key and sample:
                        yield self._sample(key, sample)
                        sample = {}
                    key = prefix
                    sample[ext.lower()] = tar.extractfile(member).read()
                if sample:
                    yield self._sample(key, sample)
        except (OSError, tarfile.TarError, ValueError) as err:  # ValueError: a sample without a label
            raise self.fail(err) from err

    def _sample(self, key: str, sample: dict[str, bytes]) -> tuple[dict[str, Any], int]:
        names = (self.image_column,) if self.image_column != "image" else IMAGE_EXTENSIONS
        image = next((sample[n] for n in names if n in sample), b"")  # b"": counted as empty, not a crash
        if self.label_column not in sample:
            raise ValueError(f"sample {key!r} has no .{self.label_column} member: {sorted(sample)}")
        return {"bytes": image, "path": f"{self.url}::{key}"}, int(sample[self.label_column].strip())


def _image_value(value: Any, url: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {"bytes": value.get("bytes"), "path": value.get("path") or url}
    return {"bytes": value, "path": url}


PART_KINDS: dict[str, type[Part]] = {"parquet": ParquetPart, "arrow": ArrowPart, "webdataset": TarPart}
SUFFIXES = {"parquet": ".parquet", "arrow": ".arrow", "webdataset": ".tar"}  # a folder's files of each kind


# --------------------------------------------------------------------------------------------- the source
class StreamedImages:
    """The rows of `parts` in order, as the `image` (undecoded `{"bytes", "path"}`) and `label` columns:
    `len`, `features`, `labels()`, and `source[i]`, `source[a:b]`, `source[[i, j, …]]` as a Dataset gives."""

    column_names = ("image", "label")

    def __init__(
        self, parts: Sequence[Part], labels: Sequence[np.ndarray], label_feature: Any, fingerprint: str
    ) -> None:
        self.parts = list(parts)
        self._labels = [np.asarray(x, np.int64) for x in labels]
        self.part_offsets = np.cumsum([0] + [len(x) for x in self._labels])
        self.features = datasets.Features(image=datasets.Image(decode=False), label=label_feature)
        self.fingerprint = fingerprint
        self.seekable = all(p.seekable for p in self.parts)

    def __len__(self) -> int:
        return int(self.part_offsets[-1])

    def __repr__(self) -> str:
        return f"StreamedImages({len(self)} rows in {len(self.parts)} parts from {self.parts[0].url!r}, …)"

    def labels(self) -> np.ndarray:
        return np.concatenate(self._labels) if self._labels else np.empty(0, np.int64)

    def head(self, rows: int) -> StreamedImages:
        """The first `rows` rows."""
        keep = int(np.searchsorted(self.part_offsets, rows, side="left"))
        labels = [
            x[: max(0, rows - start)]
            for x, start in zip(self._labels[:keep], self.part_offsets, strict=False)
        ]
        digest = hashlib.sha1(f"{self.fingerprint}:{rows}".encode()).hexdigest()[:16]
        return StreamedImages(self.parts[:keep], labels, self.features["label"], digest)

    def __getitem__(self, key: int | slice | Sequence[int]) -> dict[str, Any]:
        if isinstance(key, int | np.integer):
            row = self[[int(key)]]
            return {"image": row["image"][0], "label": row["label"][0]}
        ids = np.arange(*key.indices(len(self))) if isinstance(key, slice) else np.asarray(key, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"rows {ids.min()}..{ids.max()} are outside 0..{len(self) - 1}")
        order = np.argsort(ids, kind="stable")
        values: list[Any] = [None] * len(ids)
        part_of = np.searchsorted(self.part_offsets, ids[order], side="right") - 1
        for part in np.unique(part_of):
            picked = order[part_of == part]
            rows = ids[picked] - self.part_offsets[part]
            unique, back = np.unique(rows, return_inverse=True)
            fetched = self.parts[part].read(unique.tolist())
            for slot, j in zip(picked, back, strict=True):
                values[slot] = fetched[j]
        return {"image": [v[0] for v in values], "label": [v[1] for v in values]}


def open_streamed(
    kind: str,
    location: str,
    *,
    image_column: str = "image",
    label_column: str = "label",
    index_dir: str | Path = "data/01_raw/index",
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> StreamedImages:
    """The `kind` (`parquet`, `arrow`, `webdataset`) shards at `location` (a path, glob, `{a..b}` range or
    fsspec URL) as a `StreamedImages`. Rank r indexes parts r, r+N, … of those that need a read (tar, Arrow
    streams) into `index_dir`; every rank must call it (collective)."""
    if kind not in PART_KINDS:
        raise ValueError(f"streamed sources are {sorted(PART_KINDS)}, got {kind!r}")
    if kind == "webdataset" and label_column == "label":
        label_column = "cls"
    urls = expand_urls(location, SUFFIXES[kind])
    parts = [PART_KINDS[kind](url, image_column, label_column) for url in urls]
    with ThreadPoolExecutor(INDEX_THREADS) as pool:
        identities = list(pool.map(_identity, urls))
    fingerprint = hashlib.sha1(
        json.dumps([kind, image_column, label_column, identities]).encode()
    ).hexdigest()[:16]
    label_feature = _label_feature(parts[0])
    if kind == "parquet":  # the footer and the label column: cheap, so every rank reads them
        with ThreadPoolExecutor(INDEX_THREADS) as pool:
            labels = list(pool.map(lambda p: p.labels(), parts))
        return StreamedImages(parts, labels, label_feature, fingerprint)
    folder = Path(index_dir)
    files = [folder / f"{hashlib.sha1(json.dumps(i).encode()).hexdigest()[:20]}.npy" for i in identities]

    def index(i: int) -> np.ndarray:
        if not files[i].exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = files[i].with_name(f"{files[i].stem}.tmp{writer_id()}.npy")
            np.save(tmp, parts[i].labels())
            tmp.replace(files[i])  # atomic: another rank may be writing the same index
        return np.load(files[i])

    with ThreadPoolExecutor(INDEX_THREADS) as pool:
        list(pool.map(index, range(rank, len(parts), world)))
    barrier()
    with ThreadPoolExecutor(INDEX_THREADS) as pool:  # a rank that cannot see another's index reads itself
        labels = list(pool.map(index, range(len(parts))))
    return StreamedImages(parts, labels, label_feature, fingerprint)


def _identity(url: str) -> list[Any]:
    """A part's URL with its size and version stamps: the index and the cache key change when the file does."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no file at {url!r}") from err
    stamps = ("size", "mtime", "ETag", "etag", "LastModified", "last_modified", "created", "md5Hash")
    return [url, *(str(info[k]) for k in stamps if k in info)]


def _label_feature(part: Part) -> Any:
    """The label's ClassLabel where the schema says so (HF's parquet and Arrow files), else int64."""
    if isinstance(part, TarPart):
        return datasets.Value("int64")
    schema = part.schema()
    for column in (part.image_column, part.label_column):
        if column not in schema.names:
            raise ValueError(f"{part.url} has no column {column!r}; its columns are {schema.names}")
    feature = datasets.Features.from_arrow_schema(schema)[part.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return feature
    if not pa.types.is_integer(schema.field(part.label_column).type):
        raise ValueError(
            f"{part.url}: label column {part.label_column!r} holds {schema.field(part.label_column).type}; "
            "streamed sources need integer class ids (or a ClassLabel)"
        )
    return datasets.Value("int64")


def read_all(source: StreamedImages) -> datasets.Dataset:
    """A small streamed set (a downstream split) read once into an in-memory Dataset."""
    rows = source[:]
    features = datasets.Features(image=datasets.Image(decode=False), label=source.features["label"])
    return datasets.Dataset.from_dict(rows, features=features)
