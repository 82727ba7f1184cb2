"""Kedro I/O: datasets for image sources, Arrow caches and ViT checkpoints, and the rank-aware catalog.

The only module below `pipelines/` that imports Kedro; it adapts the Kedro-free layers to the catalog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
from kedro.io import AbstractDataset, DataCatalog, DatasetError, MemoryDataset

from vit_pipelines.data.cache import MANIFEST, ShardBuild, open_shards
from vit_pipelines.data.sources import load_image_dataset
from vit_pipelines.data.streaming import StreamedImages
from vit_pipelines.models.vit import VisionTransformer
from vit_pipelines.training.loop import process_state
from vit_pipelines.training.saving import WEIGHTS, load_model, save_model


class ImageSourceDataset(AbstractDataset[None, datasets.Dataset | StreamedImages]):
    """Read-only: an image dataset from `source` (`embedded:…`, `parquet:…`, `arrow:…`, `webdataset:…`,
    `imagefolder:…`, `hub:…`), with columns renamed to `image` and `label`. The other catalog keys (`split`,
    `image_column`, `label_column`, `limit`, `options`, `cache_dir`, `streaming`, `index_dir`) are
    `vit_pipelines.data.sources.load_image_dataset`'s; with `streaming: true` the ranks share the index pass."""

    def __init__(self, source: str, metadata: dict[str, Any] | None = None, **options: Any) -> None:
        self._source = source
        self._options = options
        self.metadata = metadata

    def load(self) -> datasets.Dataset | StreamedImages:
        if not self._options.get("streaming"):
            return load_image_dataset(self._source, **self._options)
        state = process_state()
        share = (state.process_index, state.num_processes, state.wait_for_everyone)
        return load_image_dataset(self._source, **self._options, share=share)

    def save(self, data: datasets.Dataset) -> None:
        raise DatasetError(f"{self._source!r} is a read-only image source")

    def _describe(self) -> dict[str, Any]:
        return {"source": self._source, **self._options}


class ImageShardsDataset(AbstractDataset[ShardBuild, datasets.Dataset]):
    """An image cache (`vit_pipelines.data.cache`): Arrow shards and `manifest.json` in `path`, loaded
    memory-mapped. Saving a `ShardBuild` writes it on every rank, each its share of the shards."""

    saves_on_every_rank = True

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> datasets.Dataset:
        if not (self._path / MANIFEST).exists():
            raise DatasetError(f"no image cache at {self._path}; run the pipeline that writes it first")
        return open_shards(self._path)

    def save(self, data: ShardBuild) -> None:
        state = process_state()
        data.write(self._path, state.process_index, state.num_processes, state.wait_for_everyone)

    def _exists(self) -> bool:
        return (self._path / MANIFEST).exists()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class ViTModelDataset(AbstractDataset[VisionTransformer, VisionTransformer | None]):
    """A `VisionTransformer` as `path/model.safetensors` + `path/config.json`. With `optional: true` a
    missing checkpoint loads as None, so a node can fall back to another source and explain."""

    def __init__(self, path: str, optional: bool = False, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self._optional = optional
        self.metadata = metadata

    def load(self) -> VisionTransformer | None:
        if not (self._path / WEIGHTS).exists():
            if self._optional:
                return None
            raise DatasetError(f"no checkpoint at {self._path}; run `kedro run --pipeline pretrain` first")
        return load_model(self._path)

    def save(self, data: VisionTransformer) -> None:
        save_model(data, self._path)

    def _exists(self) -> bool:
        return (self._path / WEIGHTS).exists()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class RankAwareCatalog(DataCatalog):
    """The catalog for `accelerate launch … -m kedro run`: every rank runs the same nodes, but only the main
    process writes files, except datasets that share their writing among the ranks (`saves_on_every_rank`: the
    image cache). The other ranks keep in-memory datasets only, and all ranks meet at a barrier after each save,
    so no rank reads a file before it is whole. One process: a plain `DataCatalog`."""

    def save(self, ds_name: str, data: Any) -> None:
        state = process_state()
        if state.num_processes == 1:
            return super().save(ds_name, data)
        dataset = self[ds_name]
        if state.is_main_process or isinstance(dataset, MemoryDataset) or _saves_on_every_rank(dataset):
            super().save(ds_name, data)
        state.wait_for_everyone()
        if not state.is_main_process and not isinstance(dataset, MemoryDataset) and not dataset.exists():
            raise DatasetError(
                f"rank {state.process_index} cannot see {ds_name!r} ({dataset._describe()}), which rank 0 "
                "wrote: put the data folder (data_root) on storage that every node mounts"
            )
        return None


def _saves_on_every_rank(dataset: AbstractDataset) -> bool:
    return getattr(dataset, "saves_on_every_rank", False)
