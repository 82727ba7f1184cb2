"""Batches for training and evaluation from an image cache (`data.cache`: encoded bytes or decoded pixels).

Training reads an endless stream of epochs, each a seeded permutation; batch `b` holds stream positions
`[b*B, (b+1)*B)`. Every example's random augmentation is seeded by its stream position, so batch `b` is the
same whether a run got there straight or after a resume, on any number of workers.

Workers run the host part of the pp (decode, crop, flip) and hand over uint8 batches; the element-wise tail
(`value_range`) runs on the device after the copy (`split_pp`), a quarter of float32's bytes to move.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Sampler

from vit_pipelines.data.cache import storage_mode, usable_cores
from vit_pipelines.data.ops import BadImageError, build_pp, split_pp

log = logging.getLogger(__name__)
Key = tuple[int, int]  # (row index, stream position used as the augmentation seed)
DECODE_OPS = ("decode", "decode_inception_crop")


class CachedImages(torch.utils.data.Dataset):
    """An image cache seen through the host part of a pp spec such as `"inception_crop(32)|flip_lr"`; items
    are fetched a batch at a time as uint8 `[B, 3, H, W]`. An `encoded` cache is decoded first (`decode` is
    prepended unless the spec starts with a decode op); `on_device` is the spec's device part.

    Rows are read from zero-copy views of the cache's Arrow chunks (memory-mapped where the cache is on disk),
    made on first use in the process that reads: `datasets`' own row formatting took two thirds of a
    128-image batch's time at 32 px. Pickling (DataLoader workers) carries the dataset and the pp spec, not the
    views or the built ops."""

    def __init__(self, cache: datasets.Dataset, pp: str, seed: int = 0) -> None:
        host, device = split_pp(pp)
        self.encoded = storage_mode(cache) == "encoded"
        if self.encoded and not host.lstrip().startswith(DECODE_OPS):
            host = "|".join(filter(None, ("decode", host)))
        self.cache = cache
        self.seed = seed
        self._specs = (host, device)
        self.pp, self._device_pp = build_pp(host), build_pp(device)
        self._columns: tuple[list, np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def __getstate__(self) -> dict:  # built ops are closures: a spawned worker (XLA's launcher) rebuilds them
        return {**self.__dict__, "_columns": None, "pp": None, "_device_pp": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.pp, self._device_pp = (build_pp(spec) for spec in self._specs)

    def on_device(self, images: torch.Tensor) -> torch.Tensor:
        """The pp's element-wise tail on a whole batch, where it is (no random ops: no generator needed)."""
        return self._device_pp(images, None)

    def __len__(self) -> int:
        return len(self.cache)

    def rows(self, indices: Sequence[int]) -> tuple[list | np.ndarray, np.ndarray]:
        """Images (uint8 `[n, H, W, 3]` from a pixels cache, a list of encoded bytes from an encoded one) and
        labels of the cache's rows `indices` (after any `select`/shuffle)."""
        if self._columns is None:
            chunks, starts = _image_chunks(self.cache)
            labels = self.cache.data.column("label").to_numpy()
            order = self.cache._indices  # a select/split's row mapping (uint64), else None
            physical = None if order is None else order.column(0).to_numpy().astype(np.int64)
            self._columns = (chunks, starts, labels, physical)
        chunks, starts, labels, physical = self._columns
        rows = np.asarray(indices, dtype=np.int64)
        if physical is not None:
            rows = physical[rows]
        chunk = np.searchsorted(starts, rows, side="right") - 1
        images = [chunks[c][r - starts[c]] for c, r in zip(chunk, rows, strict=True)]
        if self.encoded:
            return [image.as_py() for image in images], labels[rows]
        return np.stack(images), labels[rows]

    def __getitems__(self, keys: Sequence[Key]) -> dict[str, torch.Tensor]:
        images, labels = self.rows([k[0] for k in keys])
        if not self.encoded:
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        out = []
        for i, (image, (row, pos)) in enumerate(zip(images, keys, strict=True)):
            try:
                out.append(self.pp(image, np.random.default_rng([self.seed, pos])))
            except BadImageError as err:  # the build checked every image; this one fails only at full scale
                log.warning(
                    "row %d of the cache cannot be decoded (%s): the next row takes its place", row, err
                )
                (image,), (labels[i],) = self.rows([(row + 1) % len(self)])
                image = image if self.encoded else torch.from_numpy(image).permute(2, 0, 1)
                out.append(self.pp(image, np.random.default_rng([self.seed, pos])))
        return {"images": torch.stack(out), "labels": torch.from_numpy(labels).long()}

    def __getitem__(self, key: Key) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([key]).items()}


def _image_chunks(cache: datasets.Dataset) -> tuple[list, np.ndarray]:
    """The `image` column per Arrow chunk: a `[rows, H, W, C]` uint8 view (pixels), or the binary array
    itself (encoded); and each chunk's first row."""
    chunks = list(cache.data.column("image").chunks)
    if storage_mode(cache) == "pixels":
        shape = cache.features["image"].shape
        for i, chunk in enumerate(chunks):
            values = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            while not pa.types.is_integer(values.type):
                values = values.flatten()
            chunks[i] = values.to_numpy(zero_copy_only=True).reshape(-1, *shape)
    starts = np.cumsum([0] + [len(c) for c in chunks[:-1]])
    return chunks, starts


def content_fingerprint(cache: datasets.Dataset) -> str:
    """A hash of every image (pixels or encoded bytes) and every label: equal caches give equal keys."""
    if cache._indices is not None:
        cache = cache.flatten_indices()
    image = cache.features["image"]
    digest = hashlib.sha1(str(getattr(image, "shape", storage_mode(cache))).encode())
    for chunk in _image_chunks(cache)[0]:
        if isinstance(chunk, np.ndarray):
            digest.update(np.ascontiguousarray(chunk).data)
        else:
            for buffer in chunk.buffers()[1:]:
                digest.update(buffer or b"")
    digest.update(cache.data.column("label").to_numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def resolve_num_workers(requested: int | str, device: torch.device | str = "cpu", processes: int = 1) -> int:
    """`"auto"`: on an accelerator, every core of this process's share but one (at most 16); on a CPU, where
    the same cores compute the step, none up to 4 cores per process, else a quarter of them."""
    if requested != "auto":
        if not isinstance(requested, int) or requested < 0:
            raise ValueError(f"num_workers must be 'auto' or a whole number >= 0, got {requested!r}")
        return requested
    share = max(1, usable_cores() // max(1, processes))
    if torch.device(device).type == "cpu":
        return 0 if share <= 4 else share // 4
    return min(16, share - 1)


class StepBatchSampler(Sampler[list[Key]]):
    """Batches `start_batch … start_batch + num_batches - 1` of the endless seeded stream of epochs."""

    def __init__(
        self, num_examples: int, batch_size: int, num_batches: int, seed: int = 0, start_batch: int = 0
    ):
        if num_examples < 1:
            raise ValueError("cannot sample batches from an empty dataset")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.start_batch, self.num_batches = start_batch, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, perm = -1, np.empty(0, np.int64)
        for b in range(self.start_batch, self.start_batch + self.num_batches):
            batch = []
            for pos in range(b * self.batch_size, (b + 1) * self.batch_size):
                if pos // self.n != epoch:
                    epoch = pos // self.n
                    perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                batch.append((int(perm[pos % self.n]), pos))
            yield batch


class SequentialBatchSampler(Sampler[list[Key]]):
    """Every row once, in order, in batches of `batch_size` (the last may be smaller)."""

    def __init__(self, num_examples: int, batch_size: int) -> None:
        self.n, self.batch_size = num_examples, batch_size

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[Key]]:
        for start in range(0, self.n, self.batch_size):
            yield [(i, i) for i in range(start, min(start + self.batch_size, self.n))]


def _batch_is_ready(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def _loader(dataset: CachedImages, sampler: Sampler, num_workers: int, **options) -> DataLoader:
    workers = {"persistent_workers": True, "prefetch_factor": 4} if num_workers else {}
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_batch_is_ready,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU asynchronously
        **workers,
        **options,
    )


def train_loader(
    cache: datasets.Dataset,
    pp: str,
    batch_size: int,
    num_batches: int,
    seed: int = 0,
    start_batch: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Augmented uint8 batches of `batch_size` (all ranks together) for `num_batches` steps from `start_batch`;
    `loader.dataset.on_device` finishes them on the device."""
    sampler = StepBatchSampler(len(cache), batch_size, num_batches, seed, start_batch)
    # the generator keeps the global RNG (dropout) untouched
    return _loader(
        CachedImages(cache, pp, seed), sampler, num_workers, generator=torch.Generator().manual_seed(seed)
    )


def eval_loader(cache: datasets.Dataset, pp: str, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Every row once, in order, as uint8 batches; `loader.dataset.on_device` finishes them on the device."""
    return _loader(CachedImages(cache, pp), SequentialBatchSampler(len(cache), batch_size), num_workers)


def eval_batches(
    cache: datasets.Dataset,
    pp: str,
    batch_size: int,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """`eval_loader`'s batches on `device`, finished there: float images and labels."""
    loader = eval_loader(cache, pp, batch_size, num_workers)
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        yield {"images": loader.dataset.on_device(images), "labels": batch["labels"].to(device)}
