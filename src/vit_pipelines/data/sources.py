"""Where image datasets come from: the embedded default, parquet / Arrow / webdataset shards at local paths or
fsspec URLs (`s3://`, `gs://`, `hf://`, …), image folders, or the Hub.

Every source becomes a Hugging Face `datasets.Dataset` with an `image` column (the `datasets.Image` feature,
left undecoded so bad files surface in preprocessing rather than here) and an integer `label` column; with
`streaming=True`, parquet, webdataset and remote Arrow sources become a `StreamedImages` with the same columns,
read shard by shard where they live (see `data.streaming`).

| source                          | meaning                                                          |
|---------------------------------|------------------------------------------------------------------|
| `embedded:pretrain`             | the built-in pretraining set (built once, then kept as Arrow)    |
| `embedded:<name>` + split       | a built-in downstream set (`digits`, …), split `train` / `test`  |
| `parquet:<path, glob or URL>`   | parquet file(s), e.g. a Hub dataset's (`hf://datasets/<id>/…`);  |
|                                 | a `{split}` in any location is replaced by the split             |
| `arrow:<dir or URL>`            | a directory written by `Dataset.save_to_disk` / `DatasetDict…`   |
| `webdataset:<tar URLs>`         | tar shards, `…/train-{000000..000999}.tar`: `<key>.jpg` + `.cls`  |
| `imagefolder:<dir>`             | `<dir>/<split>/<class>/*.png` or `<dir>/<class>/*.jpg`           |
| `hub:<id>[:<config>]`           | `datasets.load_dataset(id, config, split=split)` (needs network) |
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from vit_pipelines.data import embedded
from vit_pipelines.data.streaming import StreamedImages, open_streamed, read_all
from vit_pipelines.workers import writer_id

log = logging.getLogger(__name__)
KINDS = ("embedded", "parquet", "arrow", "webdataset", "imagefolder", "hub")
STREAMED = ("parquet", "arrow", "webdataset")


def load_image_dataset(
    source: str,
    split: str | None = None,
    *,
    image_column: str = "image",
    label_column: str = "label",
    limit: int | None = None,
    options: dict[str, Any] | None = None,
    cache_dir: str | Path = "data/01_raw/embedded",
    streaming: bool = False,
    index_dir: str | Path = "data/01_raw/index",
    share: tuple[int, int, Callable[[], None]] = (0, 1, lambda: None),
) -> datasets.Dataset | StreamedImages:
    """Load `source` (see the module table) as a Dataset with columns `image` and `label`.

    `limit` keeps the first `limit` rows (for smoke runs); `options` go to the embedded builders
    (`num_images`, `image_size`, `seed`). `streaming` leaves parquet, webdataset and remote Arrow sources
    where they are (a `StreamedImages`; the others are memory-mapped already); without it they are read into
    memory (small sets) or, local parquet, converted once by `datasets`. `share` is (rank, ranks, barrier):
    the ranks share the index pass of tar and Arrow shards, kept in `index_dir`.
    """
    kind, sep, location = source.partition(":")
    if not sep or kind not in KINDS or not location:
        raise ValueError(f"source must be '<kind>:<location>' with kind in {KINDS}, got {source!r}")
    location = location.replace("{split}", split) if split and "{split}" in location else location
    # local Arrow folders are memory-mapped as they are; the rest of the shard formats stream
    if kind in STREAMED and ("://" in location or kind == "webdataset" or (streaming and kind == "parquet")):
        rank, world, barrier = share
        columns = {"image_column": image_column, "label_column": label_column, "index_dir": index_dir}
        stream = open_streamed(kind, location, **columns, rank=rank, world=world, barrier=barrier)
        stream = stream.head(limit) if limit is not None else stream
        return stream if streaming else read_all(stream)
    if kind == "embedded":
        ds = _load_embedded(location, split, options or {}, Path(cache_dir))
    elif kind == "parquet":
        ds = datasets.load_dataset("parquet", data_files={"data": _existing(location)}, split="data")
    elif kind == "arrow":
        ds = datasets.load_from_disk(_existing(location))
        if isinstance(ds, datasets.DatasetDict):
            ds = _pick_split(ds, split, source)
    elif kind == "imagefolder":
        dd = datasets.load_dataset("imagefolder", data_dir=_existing(location))
        ds = _pick_split(dd, split, source)
    else:
        name, _, config = location.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    ds = _standardise_columns(ds, image_column, label_column, source)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def _existing(location: str) -> str:
    if not glob.glob(location):
        raise FileNotFoundError(f"no files at {location!r}")
    return location


def _pick_split(dd: datasets.DatasetDict, split: str | None, source: str) -> datasets.Dataset:
    if split is None and len(dd) == 1:
        return next(iter(dd.values()))
    if split not in dd:
        raise ValueError(f"{source!r} has splits {sorted(dd)}; choose one with `split`, got {split!r}")
    return dd[split]


def _standardise_columns(
    ds: datasets.Dataset, image_column: str, label_column: str, source: str
) -> datasets.Dataset:
    for column in (image_column, label_column):
        if column not in ds.column_names:
            raise ValueError(f"{source!r} has no column {column!r}; its columns are {ds.column_names}")
    ds = ds.select_columns([image_column, label_column])
    ds = ds.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label")) if c != n})
    if getattr(ds.features["label"], "dtype", None) in ("string", "large_string"):
        ds = ds.class_encode_column("label")  # class names: ids in sorted name order, the names kept
    if not isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image())
    return ds.cast_column("image", datasets.Image(decode=False))


def _load_embedded(
    name: str, split: str | None, options: dict[str, Any], cache_dir: Path
) -> datasets.Dataset:
    """Build an embedded set once per (version, name, options) and keep it under `cache_dir` as Arrow."""
    if name != "pretrain" and name not in embedded.DOWNSTREAM_NAMES:
        raise ValueError(
            f"unknown embedded set {name!r}; known: pretrain, {', '.join(embedded.DOWNSTREAM_NAMES)}"
        )
    key = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    path = cache_dir / f"v{embedded.EMBEDDED_VERSION}" / f"{name}-{key}"
    if not path.exists():
        log.info("building the embedded %r set (once) into %s", name, path)
        built = (
            embedded.build_pretrain(**options)
            if name == "pretrain"
            else embedded.build_downstream(name, **options)
        )
        tmp = path.with_name(f"{path.name}.tmp{writer_id()}")  # ranks may build at once
        shutil.rmtree(tmp, ignore_errors=True)
        built.save_to_disk(str(tmp))
        try:
            tmp.rename(path)  # atomic: a crash mid-build leaves no half-written set behind
        except OSError:
            if not path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same set first
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, f"embedded:{name}")
    return ds
