"""Decode and resize a dataset once into an Arrow cache of fixed-size uint8 images, so epochs never re-decode."""

from __future__ import annotations

from collections import Counter
from typing import Any

import datasets
import numpy as np

from vit_pipelines.data.ops import BadImageError, build_pp, open_image

_OK = "ok"


def cache_images(
    dataset: datasets.Dataset, pp: str, num_proc: int | None = None, batch_size: int = 256
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Apply the deterministic pp `pp` (which must start with `decode` and end at a fixed size, e.g.
    `"decode|resize_small(36)|central_crop(32)"`) to every image.

    Returns the cache (columns `image`: uint8 `[H, W, 3]`, `label`: int) and a report counting the images
    kept, the colour modes that were converted and the images skipped by reason (empty, corrupt, too_small).
    """
    if not pp.lstrip().startswith("decode"):
        raise ValueError(f"the cache pp must start with 'decode', got {pp!r}")
    if len(dataset) == 0:
        raise ValueError("cannot cache an empty dataset")
    op = build_pp(pp)
    probe = _first_good_shape(dataset, op)

    def process(batch: dict[str, list]) -> dict[str, list]:
        images, statuses, modes = [], [], []
        for value in batch["image"]:
            try:
                image, mode = open_image(value)
                array = op(image, np.random.default_rng(0)).permute(1, 2, 0).numpy()
                if array.shape != probe:
                    raise ValueError(
                        f"pp {pp!r} gave shape {array.shape} and {probe}: end it at a fixed size"
                    )
                images.append(array)
                statuses.append(_OK)
                modes.append(mode)
            except BadImageError as err:
                images.append(np.zeros(probe, np.uint8))
                statuses.append(err.reason)
                modes.append("")
        return {"image": images, "label": batch["label"], "status": statuses, "mode": modes}

    features = datasets.Features(
        image=datasets.Array3D(probe, "uint8"),
        label=datasets.Value("int64"),
        status=datasets.Value("string"),
        mode=datasets.Value("string"),
    )
    processed = dataset.map(
        process,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        features=features,
        remove_columns=dataset.column_names,
        desc=f"caching {pp}",
    )
    statuses = Counter(processed["status"])
    modes = Counter(m for m, s in zip(processed["mode"], processed["status"], strict=True) if s == _OK)
    kept = processed.filter(lambda s: [x == _OK for x in s], input_columns="status", batched=True)
    report = {
        "pp": pp,
        "images_in": len(dataset),
        "images_kept": statuses[_OK],
        "skipped": {reason: n for reason, n in sorted(statuses.items()) if reason != _OK},
        "converted_to_rgb": {mode: n for mode, n in sorted(modes.items()) if mode != "RGB"},
        "image_shape": list(probe),
    }
    cache = kept.remove_columns(["status", "mode"])
    if isinstance(dataset.features.get("label"), datasets.ClassLabel):
        cache = cache.cast_column("label", dataset.features["label"])
    return cache, report


def _first_good_shape(dataset: datasets.Dataset, op: Any) -> tuple[int, int, int]:
    for value in dataset.select(range(min(len(dataset), 64)))["image"]:
        try:
            return tuple(op(value, np.random.default_rng(0)).permute(1, 2, 0).shape)
        except BadImageError:
            continue
    raise ValueError("none of the first 64 images could be decoded")


def split_minival(
    dataset: datasets.Dataset, fraction: float, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out `fraction` of the rows (stratified by label where it is a ClassLabel) as minival."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"minival fraction must be in (0, 1), got {fraction}")
    stratify = "label" if isinstance(dataset.features["label"], datasets.ClassLabel) else None
    parts = dataset.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
    return parts["train"], parts["test"]


def num_classes(dataset: datasets.Dataset) -> int:
    """Classes from the ClassLabel feature, else 1 + the largest label."""
    feature = dataset.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return int(max(dataset["label"])) + 1
