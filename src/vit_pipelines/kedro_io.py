"""Kedro I/O: datasets for image sources, Arrow caches and ViT checkpoints, and the rank-aware catalog.

The only module below `pipelines/` that imports Kedro; it adapts the Kedro-free layers to the catalog.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import datasets
from kedro.io import (
    AbstractDataset,
    AbstractVersionedDataset,
    DataCatalog,
    DatasetError,
    MemoryDataset,
    Version,
)
from kedro.io.core import VERSION_FORMAT, VersionNotFoundError

from vit_pipelines.data.cache import MANIFEST, ShardBuild, open_shards
from vit_pipelines.data.sources import load_image_dataset
from vit_pipelines.data.streaming import StreamedImages
from vit_pipelines.models.vit import VisionTransformer
from vit_pipelines.training.loop import process_state
from vit_pipelines.training.saving import CONFIG, LABELS, WEIGHTS, load_model, save_model

log = logging.getLogger(__name__)


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


class ViTModelDataset(AbstractVersionedDataset[VisionTransformer, VisionTransformer | None]):
    """A `VisionTransformer` as `path/model.safetensors` + `path/config.json`; with `versioned: true`, each run
    saves `path/<version>/` and loads the newest (or `--load-versions <name>:<version>`). With
    `optional: true` a missing checkpoint loads as None, so a node can fall back to another source and
    explain."""

    def __init__(
        self,
        path: str,
        optional: bool = False,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(PurePosixPath(path), version)
        self._optional = optional
        self.metadata = metadata

    def _get_versioned_path(self, version: str) -> PurePosixPath:
        return self._filepath / version / WEIGHTS  # `pretrain/<version>/model.safetensors` and its config

    def _weights(self) -> Path:
        return Path(self._get_load_path() if self._version else self._filepath / WEIGHTS)

    def load(self) -> VisionTransformer | None:
        if not self._exists():
            if self._optional:
                return None
            raise DatasetError(
                f"no checkpoint at {self._filepath}; run `kedro run --pipelines pretrain` first"
            )
        if self._version:  # which run a later pipeline starts from
            log.info("model of version %s (%s)", self.resolve_load_version(), self._filepath)
        return load_model(self._weights().parent)

    def save(self, data: VisionTransformer) -> None:
        save_model(data, Path(self._get_save_path()).parent if self._version else self._filepath)

    def saved_folder(self) -> Path:
        """The folder `save` writes (or wrote): this run's version folder, or `path` when unversioned."""
        if self._version:
            return Path(self._get_versioned_path(self.resolve_save_version())).parent
        return Path(self._filepath)

    def _exists(self) -> bool:
        try:
            return self._weights().exists()
        except VersionNotFoundError:
            return False

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._filepath), "version": self._version}


def version_earlier_result(dataset: AbstractDataset) -> Path | None:
    """A versioned dataset's output that an earlier release wrote without a version (`x.json` as a file, a model
    folder with its weights at the top) moved into `<path>/<its time>/`, where versioned saving and loading see
    it; the new folder, or None when there was nothing to move."""
    if not isinstance(dataset, AbstractVersionedDataset) or not dataset._version:
        return None
    path = Path(str(dataset._filepath))
    model = isinstance(dataset, ViTModelDataset) and (path / WEIGHTS).is_file()
    if not (path.is_file() or model):
        return None
    moved = [path / name for name in (LABELS, CONFIG, WEIGHTS) if (path / name).exists()] if model else [path]
    stamp = datetime.fromtimestamp(moved[-1].stat().st_mtime, timezone.utc).strftime(VERSION_FORMAT)
    version = stamp[:-4] + stamp[-1:]  # milliseconds, as Kedro's generate_timestamp writes them
    if model:
        (path / version).mkdir()
        for file in moved:
            file.rename(path / version / file.name)
        return path / version
    tmp = path.with_name(path.name + ".unversioned")
    path.rename(tmp)
    (path / version).mkdir(parents=True)
    tmp.rename(path / version / path.name)
    return path / version


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
