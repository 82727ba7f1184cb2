"""Batches for training and evaluation from an Arrow image cache.

Training reads an endless stream of epochs, each a seeded permutation; batch `b` holds stream positions
`[b*B, (b+1)*B)`. Every example's random augmentation is seeded by its stream position, so batch `b` is the
same whether a run got there straight or after a resume, on any number of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Sampler

from vit_pipelines.data.ops import build_pp

Key = tuple[int, int]  # (row index, stream position used as the augmentation seed)


class CachedImages(torch.utils.data.Dataset):
    """An Arrow cache (`image` uint8 `[H, W, 3]`, `label`) seen through a pp spec such as
    `"inception_crop(32)|flip_lr|value_range(-1,1)"`; items are fetched a batch at a time.

    Rows are read from zero-copy numpy views of the cache's Arrow chunks (memory-mapped where the cache is on
    disk), made on first use in the process that reads: `datasets`' own row formatting took two thirds of a
    128-image batch's time at 32 px. Pickling (DataLoader workers) carries the dataset, not the views."""

    def __init__(self, cache: datasets.Dataset, pp: str, seed: int = 0) -> None:
        self.cache = cache
        self.pp = build_pp(pp)
        self.seed = seed
        self._columns: tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_columns": None}

    def __len__(self) -> int:
        return len(self.cache)

    def rows(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Images `[n, H, W, 3]` uint8 and labels of the cache's rows `indices` (after any `select`/shuffle)."""
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
        images = np.stack([chunks[c][r - starts[c]] for c, r in zip(chunk, rows, strict=True)])
        return images, labels[rows]

    def __getitems__(self, keys: Sequence[Key]) -> dict[str, torch.Tensor]:
        images, labels = self.rows([k[0] for k in keys])
        out = [
            self.pp(image, np.random.default_rng([self.seed, pos]))
            for image, (_, pos) in zip(torch.from_numpy(images).permute(0, 3, 1, 2), keys, strict=True)
        ]
        return {"images": torch.stack(out), "labels": torch.from_numpy(labels).long()}

    def __getitem__(self, key: Key) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([key]).items()}


def _image_chunks(cache: datasets.Dataset) -> tuple[list[np.ndarray], np.ndarray]:
    """The `image` column as one `[rows, H, W, C]` uint8 view per Arrow chunk, and each chunk's first row."""
    shape = cache.features["image"].shape
    chunks = []
    for chunk in cache.data.column("image").chunks:
        values = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        while not pa.types.is_integer(values.type):
            values = values.flatten()
        chunks.append(values.to_numpy(zero_copy_only=True).reshape(-1, *shape))
    starts = np.cumsum([0] + [len(c) for c in chunks[:-1]])
    return chunks, starts


def content_fingerprint(cache: datasets.Dataset) -> str:
    """A hash of every image's pixels and every label: equal caches give equal keys, across runs."""
    if cache._indices is not None:
        cache = cache.flatten_indices()
    digest = hashlib.sha1(str(cache.features["image"].shape).encode())
    for chunk in _image_chunks(cache)[0]:
        digest.update(np.ascontiguousarray(chunk).data)
    digest.update(cache.data.column("label").to_numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


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


def train_loader(
    cache: datasets.Dataset,
    pp: str,
    batch_size: int,
    num_batches: int,
    seed: int = 0,
    start_batch: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Augmented batches of `batch_size` (all ranks together) for `num_batches` steps from `start_batch`."""
    sampler = StepBatchSampler(len(cache), batch_size, num_batches, seed, start_batch)
    return DataLoader(
        CachedImages(cache, pp, seed),
        batch_sampler=sampler,
        collate_fn=_batch_is_ready,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG (dropout) untouched
    )


def eval_loader(cache: datasets.Dataset, pp: str, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        CachedImages(cache, pp),
        batch_sampler=SequentialBatchSampler(len(cache), batch_size),
        collate_fn=_batch_is_ready,
        num_workers=num_workers,
    )
