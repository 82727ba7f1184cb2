"""The image cache: rows of a source written once as bounded Arrow shards, read memory-mapped by every epoch.

Two storage modes:
- `encoded`: each image's bytes as they came (JPEG, PNG, WebP; other formats re-encoded losslessly as PNG),
  checked once here; loader workers decode, crop and flip every sample from the full-resolution image.
- `pixels`: uint8 arrays after a fixed-size pp such as `"decode|resize(36)"`, for tiny images where decoding
  would dominate the step.

A cache folder holds `shard-00000.arrow, …` and `manifest.json` (storage mode, rows and bytes per shard, the
build's report). Shard `i` holds rows `[i*R, (i+1)*R)` of the rows asked for (cut also where a streamed
source's parts end), whoever writes it: any number of ranks and worker processes write the same files. An interrupted build keeps its finished shards and resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from vit_pipelines.data.ops import BadImageError, build_pp, open_image
from vit_pipelines.data.streaming import StreamedImages
from vit_pipelines.workers import die_with_parent, writer_id

log = logging.getLogger(__name__)

STORAGE_MODES = ("encoded", "pixels")
KEPT_FORMATS = ("JPEG", "PNG", "WEBP")  # stored as they came; anything else PIL reads is re-encoded as PNG
MANIFEST = "manifest.json"
EXAMPLES_PER_REASON = 5  # skipped images named in the report, per reason


def check_encoded(data: bytes | PIL.Image.Image) -> tuple[bytes, str]:
    """An image's bytes to store and its format, after decoding it once (JPEGs at 1/8 scale: enough to find
    truncation); formats outside `KEPT_FORMATS` come back re-encoded as PNG. Raises `BadImageError`."""
    image, _ = open_image(data, load=False)
    fmt = image.format or "unknown"
    try:
        if fmt == "JPEG":
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
    except Exception as err:
        raise BadImageError("corrupt", str(err)) from err
    if fmt in KEPT_FORMATS and isinstance(data, bytes | bytearray):
        return bytes(data), fmt
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), fmt


@dataclass(frozen=True)
class ShardBuild:
    """`rows` of `source` (in that order) to write as `storage` shards of about `shard_bytes` each.

    A node returns it; the catalog's `ImageShardsDataset` writes it on every rank (`write`), so the work is
    shared. `pp` is the fixed-size decode pp of the `pixels` mode."""

    source: datasets.Dataset | StreamedImages
    rows: np.ndarray
    storage: str = "encoded"
    pp: str | None = None
    shard_bytes: int = 256 << 20
    num_proc: int = 1
    name: str = "cache"
    _plan: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.storage not in STORAGE_MODES:
            raise ValueError(f"storage must be one of {STORAGE_MODES}, got {self.storage!r}")
        if self.storage == "pixels" and not (self.pp or "").lstrip().startswith("decode"):
            raise ValueError(f"the pixels storage needs a pp starting with 'decode', got {self.pp!r}")
        if len(self.rows) == 0:
            raise ValueError(f"{self.name}: no images to cache")

    # ---------------------------------------------------------------------------------------------- layout
    @property
    def plan(self) -> dict[str, Any]:
        """Rows per shard, the pixel shape (pixels mode) and a key naming this exact build."""
        if not self._plan:
            sample = self.source[[int(i) for i in self.rows[:64]]]["image"]
            if self.storage == "pixels":
                shape = _first_good_shape(sample, build_pp(self.pp))
                h, w, c = shape
                image_bytes = h * w * c + 4 * (h * w + h + 1)  # Array3D: nested lists, an offset per list
            else:
                shape = None
                image_bytes = int(np.mean([len(_raw_bytes(v)) for v in sample])) + 4
            row_bytes = image_bytes + 16  # label, source_index
            rows_per_shard = max(1, min(len(self.rows), self.shard_bytes // row_bytes))
            starts = self._shard_starts(rows_per_shard)
            key = hashlib.sha1(
                json.dumps([fingerprint(self.source), self.storage, self.pp, starts, shape]).encode()
                + np.asarray(self.rows, np.int64).tobytes()
            ).hexdigest()[:16]
            self._plan.update(starts=starts, shape=shape, key=key)
        return self._plan

    def _shard_starts(self, rows_per_shard: int) -> list[int]:
        """Where each shard starts in `rows`: every `rows_per_shard` rows, and for a streamed source at each of
        its parts, so a shard reads one part; a part read front to back (tar) is never split."""
        starts = np.arange(0, len(self.rows), rows_per_shard)
        if isinstance(self.source, StreamedImages):
            parts = np.searchsorted(self.rows, self.source.part_offsets[1:-1])
            starts = np.union1d(starts, parts) if self.source.seekable else np.append(parts, 0)
        return sorted({int(s) for s in starts if s < len(self.rows)})

    @property
    def num_shards(self) -> int:
        return len(self.plan["starts"])

    def features(self) -> datasets.Features:
        label = self.source.features["label"]
        image = (
            datasets.Array3D(tuple(self.plan["shape"]), "uint8")
            if self.storage == "pixels"
            else datasets.Value("binary")
        )
        return datasets.Features(
            image=image,
            label=label if isinstance(label, datasets.ClassLabel) else datasets.Value("int64"),
            source_index=datasets.Value("int64"),
        )

    # ---------------------------------------------------------------------------------------------- writing
    def write(
        self, folder: str | Path, rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None
    ) -> dict[str, Any]:
        """Write the shards of this rank (`i % world == rank`) into `folder`; rank 0 then writes the manifest
        and moves the finished folder into place. Every rank must call it (collective). A folder that already
        holds this exact build is kept as it is."""
        folder = Path(folder)
        partial = folder.with_name(folder.name + ".partial")
        key = self.plan["key"]
        done = _read_json(folder / MANIFEST)
        if done.get("key") == key:  # the same rows, storage and pp are already cached: nothing to write
            if rank == 0:
                log.info("%s already holds these rows, stored the same way: kept", folder)
            return done
        if rank == 0:
            if _read_json(partial / "build.json").get("key") != key:  # another build's leftovers
                shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True, exist_ok=True)
            (partial / "build.json").write_text(json.dumps({"key": key}))
        barrier()
        if not (partial / "build.json").exists():
            raise FileNotFoundError(
                f"rank {rank} cannot see {partial}, which rank 0 created: "
                "put the data folder on storage that every node mounts"
            )
        mine = [i for i in range(rank, self.num_shards, world) if not (partial / _stats_name(i)).exists()]
        started = time.perf_counter()
        _write_shards(self, partial, mine, rank)
        barrier()
        manifest = None
        if rank == 0:
            manifest = self._manifest(partial, time.perf_counter() - started, world)
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
            (partial / "build.json").unlink()
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
        barrier()
        return manifest or read_manifest(folder)

    def write_shard(self, index: int, folder: Path, rank: int = 0) -> dict[str, Any]:
        """Shard `index`: its rows processed in order into `folder/shard-<index>.arrow`, with its statistics
        (`rank`: who wrote it, for the manifest)."""
        bounds = [*self.plan["starts"], len(self.rows)]
        rows = self.rows[bounds[index] : bounds[index + 1]]
        op = build_pp(self.pp) if self.storage == "pixels" else None
        counts, formats, examples = Counter(), Counter(), {}
        started = time.perf_counter()
        path = folder / _shard_name(index)
        tmp = path.with_suffix(f".tmp{writer_id()}")
        source_bytes = 0
        with ArrowWriter(features=self.features(), path=str(tmp), writer_batch_size=256) as writer:
            for first in range(0, len(rows), 256):
                ids = [int(i) for i in rows[first : first + 256]]
                batch = self.source[ids]
                kept: dict[str, list] = {"image": [], "label": [], "source_index": []}
                for row, value, label in zip(ids, batch["image"], batch["label"], strict=True):
                    data = value if isinstance(value, PIL.Image.Image) else _raw_bytes(value)
                    source_bytes += len(data) if isinstance(data, bytes | bytearray) else 0
                    try:
                        stored, fmt = self.stored(data, op)
                    except BadImageError as err:
                        counts[err.reason] += 1
                        names = examples.setdefault(err.reason, [])
                        if len(names) < EXAMPLES_PER_REASON:
                            names.append(_describe(row, value))
                        continue
                    kept["image"].append(stored)
                    formats[fmt] += 1
                    kept["label"].append(label)
                    kept["source_index"].append(row)
                if kept["label"]:
                    writer.write_batch(kept)
            writer.finalize()
        tmp.rename(path)
        stats = {
            "file": path.name,
            "rows": len(rows) - sum(counts.values()),
            "bytes": path.stat().st_size,
            "source_bytes": source_bytes,
            "skipped": dict(counts),
            "examples": examples,
            "formats": dict(formats),
            "seconds": round(time.perf_counter() - started, 3),
            "rank": rank,
        }
        (folder / _stats_name(index)).write_text(json.dumps(stats))
        return stats

    def stored(self, data: bytes | PIL.Image.Image, op: Any) -> tuple[Any, str]:
        """One image as this storage keeps it, with its format (encoded) or colour mode (pixels, `op` the
        compiled pp). Raises `BadImageError`."""
        if self.storage == "encoded":
            return check_encoded(data)
        image, mode = open_image(data)
        array = op(image, np.random.default_rng(0)).permute(1, 2, 0).numpy()
        if list(array.shape) != list(self.plan["shape"]):
            raise ValueError(
                f"pp {self.pp!r} gave shape {array.shape} and {self.plan['shape']}: end it at a fixed size"
            )
        return array, mode

    def _manifest(self, folder: Path, seconds: float, world: int) -> dict[str, Any]:
        shards = [_read_json(folder / _stats_name(i)) for i in range(self.num_shards)]
        skipped, formats, examples = Counter(), Counter(), {}
        for s in shards:
            skipped.update(s["skipped"])
            formats.update(s["formats"])
            for reason, names in s["examples"].items():
                examples.setdefault(reason, []).extend(names)
        kept = sum(s["rows"] for s in shards)
        stored = sum(s["bytes"] for s in shards)
        source = sum(s["source_bytes"] for s in shards)
        for i in range(self.num_shards):
            (folder / _stats_name(i)).unlink()
        reencoded = {f: n for f, n in formats.items() if f not in KEPT_FORMATS}
        return {
            "name": self.name,
            "key": self.plan["key"],
            "storage": self.storage,
            "pp": self.pp,
            "image_shape": self.plan["shape"],
            "images_in": len(self.rows),
            "images_kept": kept,
            "skipped": dict(sorted(skipped.items())),
            "skipped_examples": {r: names[:EXAMPLES_PER_REASON] for r, names in sorted(examples.items())},
            **(
                {"formats": dict(sorted(formats.items())), "reencoded_as_png": reencoded}
                if self.storage == "encoded"
                else {"converted_to_rgb": {m: n for m, n in sorted(formats.items()) if m != "RGB"}}
            ),
            "shards": [{k: s[k] for k in ("file", "rows", "bytes", "rank")} for s in shards],
            "bytes": stored,
            "bytes_per_image": round(stored / max(kept, 1), 1),
            "source_bytes": source,
            "bytes_over_source": round(stored / max(source, 1), 4),
            "build_seconds": round(seconds, 2),
            "processes": world * self.num_proc,
        }


_BUILD: dict[str, Any] = {}  # each worker's ShardBuild and folder, set once by `_start_worker`


def _start_worker(build: ShardBuild, folder: Path, rank: int) -> None:
    die_with_parent()
    # a forked child must not enter the parent's OpenMP pool (it hangs); the processes give the parallelism
    torch.set_num_threads(1)
    _BUILD.update(build=build, folder=folder, rank=rank)


def _worker_shard(index: int) -> dict[str, Any]:
    return _BUILD["build"].write_shard(index, _BUILD["folder"], _BUILD["rank"])


def _write_shards(build: ShardBuild, folder: Path, shards: list[int], rank: int) -> None:
    bar = tqdm(total=len(shards), desc=f"writing {build.name} shards", unit="shard", disable=rank != 0)
    if build.num_proc <= 1 or len(shards) <= 1:
        for i in shards:
            build.write_shard(i, folder, rank)
            bar.update()
    else:
        # fork: workers inherit the memory-mapped source instead of pickling it
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        workers = min(build.num_proc, len(shards))
        with ProcessPoolExecutor(workers, context, _start_worker, (build, folder, rank)) as pool:
            for _ in pool.map(_worker_shard, shards):
                bar.update()
    bar.close()


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_num_proc(requested: int | str | None, processes: int = 1) -> int:
    """Worker processes per rank for the cache build: `"auto"` (or None) shares the cores among the ranks."""
    if requested in ("auto", None):
        return max(1, usable_cores() // max(1, processes))
    if not isinstance(requested, int) or requested < 1:
        raise ValueError(f"num_proc must be 'auto' or a whole number >= 1, got {requested!r}")
    return requested


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def _stats_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _raw_bytes(value: Any) -> bytes:
    """The encoded bytes of an undecoded `datasets.Image` value (`{"bytes", "path"}`), or b"" where none."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and os.path.exists(value["path"]):
            return Path(value["path"]).read_bytes()
        return b""
    return value if isinstance(value, bytes | bytearray) else b""


def fingerprint(source: datasets.Dataset | StreamedImages) -> str:
    """What identifies a source's content: the `datasets` fingerprint, or a streamed source's own."""
    return source.fingerprint if isinstance(source, StreamedImages) else source._fingerprint


def _describe(row: int, value: Any) -> str:
    path = value.get("path") if isinstance(value, dict) else None
    return f"row {row}" + (f" ({path})" if path else "")


def open_shards(folder: str | Path) -> datasets.Dataset:
    """The cache in `folder` as one memory-mapped Dataset (`image`, `label`, `source_index`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    parts = []
    for shard in manifest["shards"]:
        try:
            parts.append(datasets.Dataset.from_file(str(folder / shard["file"])))
        except Exception as err:  # pyarrow raises several kinds on a damaged file
            raise OSError(f"cannot read cache shard {folder / shard['file']}: {err}") from err
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def read_manifest(folder_or_cache: str | Path | datasets.Dataset) -> dict[str, Any]:
    """A cache folder's `manifest.json`, from the folder or from the Dataset `open_shards` gave."""
    if isinstance(folder_or_cache, datasets.Dataset):
        if not folder_or_cache.cache_files:
            raise ValueError("this Dataset is not a cache on disk")
        folder_or_cache = Path(folder_or_cache.cache_files[0]["filename"]).parent
    path = Path(folder_or_cache) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no image cache at {path.parent} (no {MANIFEST})")
    return json.loads(path.read_text())


def storage_mode(cache: datasets.Dataset) -> str:
    """ "pixels" where `image` holds decoded arrays, else "encoded"."""
    return "pixels" if isinstance(cache.features["image"], datasets.Array3D) else "encoded"


# ------------------------------------------------------------------------------- small sets, held in memory
def cache_images(dataset: datasets.Dataset, pp: str) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The `pixels` cache of a small set (downstream splits), held in memory: `pp` (which must start with
    `decode` and end at a fixed size, e.g. `"decode|resize_small(36)|central_crop(32)"`) applied to every
    image. Returns the cache (`image` uint8 `[H, W, 3]`, `label`, `source_index`) and the build's report."""
    if not pp.lstrip().startswith("decode"):
        raise ValueError(f"the cache pp must start with 'decode', got {pp!r}")
    if len(dataset) == 0:
        raise ValueError("cannot cache an empty dataset")
    build = ShardBuild(dataset, np.arange(len(dataset)), "pixels", pp, shard_bytes=1 << 62)
    with tempfile.TemporaryDirectory(prefix="vit-cache-") as tmp:
        folder = Path(tmp)
        build.write_shard(0, folder)
        stats = json.loads((folder / _stats_name(0)).read_text())
        cache = datasets.Dataset.from_file(str(folder / _shard_name(0)), in_memory=True)
    report = {
        "pp": pp,
        "images_in": len(dataset),
        "images_kept": stats["rows"],
        "skipped": dict(sorted(stats["skipped"].items())),
        "converted_to_rgb": {m: n for m, n in sorted(stats["formats"].items()) if m != "RGB"},
        "image_shape": list(build.plan["shape"]),
    }
    return cache, report


def _first_good_shape(values: Sequence[Any], op: Any) -> list[int]:
    for value in values:
        try:
            return list(op(value, np.random.default_rng(0)).permute(1, 2, 0).shape)
        except BadImageError:
            continue
    raise ValueError("none of the first 64 images could be decoded")


# ----------------------------------------------------------------------------------------------- splits
def split_rows(
    labels: np.ndarray, fraction: float, seed: int = 0, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of a (train, held-out) split holding out `fraction` of `labels`' rows, by class where
    `stratify` (each class's share rounded so the total is ceil(fraction * rows)); both in ascending order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"minival fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    total = int(np.ceil(fraction * len(labels)))
    order = np.random.default_rng(seed).permutation(len(labels))
    if not stratify:
        held = order[:total]
    else:
        classes, counts = np.unique(labels, return_counts=True)
        share = counts * total / len(labels)
        take = np.floor(share).astype(int)
        for c in np.argsort(-(share - take), kind="stable")[: total - take.sum()]:
            take[c] += 1
        shuffled = labels[order]
        held = np.concatenate(
            [order[shuffled == c][:n] for c, n in zip(classes, take, strict=True)] or [np.empty(0, int)]
        )
    mask = np.zeros(len(labels), bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def split_minival(
    dataset: datasets.Dataset, fraction: float, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out `fraction` of the rows, stratified by label, as minival."""
    train, held = split_rows(label_array(dataset), fraction, seed)
    return dataset.select(train), dataset.select(held)


def label_array(dataset: datasets.Dataset | StreamedImages) -> np.ndarray:
    """The `label` column as int64, without reading the images."""
    if isinstance(dataset, StreamedImages):
        return dataset.labels()
    return np.asarray(dataset.select_columns(["label"]).with_format("numpy")[:]["label"], np.int64)


def num_classes(dataset: datasets.Dataset | StreamedImages) -> int:
    """Classes from the ClassLabel feature, else `classes_of` the labels."""
    feature = dataset.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return classes_of(label_array(dataset))


def check_class_ids(labels: np.ndarray, feature: Any) -> None:
    """Labels must be class ids: those of a ClassLabel, else ids 0..K-1 as `classes_of` checks."""
    if not isinstance(feature, datasets.ClassLabel):
        classes_of(labels)
        return
    outside = np.unique(labels[(labels < 0) | (labels >= feature.num_classes)])
    if len(outside):
        shown = ", ".join(str(int(v)) for v in outside[:5]) + (", …" if len(outside) > 5 else "")
        names = ", ".join(feature.names[:5]) + (", …" if feature.num_classes > 5 else "")
        raise ValueError(
            f"labels {shown} are outside the label column's {feature.num_classes} class names ({names}): "
            f"ids run 0..{feature.num_classes - 1}"
        )


def classes_of(labels: np.ndarray) -> int:
    """1 + the largest of integer labels, once they look like class ids 0..K-1: a stray 999 among 0-2 would
    silently make a 1,000-class head, mostly unused."""
    distinct = np.unique(labels)
    if len(distinct) == 0:
        raise ValueError("no labels")
    if distinct[0] < 0:
        raise ValueError(f"labels must be class ids >= 0, found {int(distinct[0])}")
    top = int(distinct[-1]) + 1
    if top > 2 * len(distinct):
        values = [str(int(v)) for v in distinct]
        shown = ", ".join(values if len(values) <= 6 else [*values[:5], "…", values[-1]])
        raise ValueError(
            f"labels are not class ids 0..K-1: {len(distinct)} distinct values ({shown}) "
            f"would make a {top}-class head, mostly unused: map them to 0..{len(distinct) - 1}"
        )
    return top
