"""Nodes of the `analysis` pipeline: thin wrappers over `evaluation.analysis`. Each returns its numbers and its
figure; `report` gathers the numbers into `analysis.json`."""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch
from matplotlib.figure import Figure

from vit_pipelines.data.loader import eval_batches
from vit_pipelines.evaluation import analysis
from vit_pipelines.evaluation.fewshot import pp_for_size
from vit_pipelines.models import VisionTransformer
from vit_pipelines.pipelines.downstream import start_model


def select_model(pretrained_model: VisionTransformer | None, params: dict[str, Any]) -> VisionTransformer:
    """`analysis.checkpoint.path` if set, else the latest pretraining output."""
    return start_model(pretrained_model, params, pipeline="analysis")


def _images(
    model: VisionTransformer, cache: datasets.Dataset, params: dict[str, Any], count: int
) -> torch.Tensor:
    pp = pp_for_size(params["pp"], model.config.image_size)
    return next(eval_batches(cache.select(range(min(count, len(cache)))), pp, count))["images"]


def patch_embedding(model: VisionTransformer, params: dict[str, Any]) -> tuple[dict[str, Any], Figure]:
    components, variance = analysis.patch_embedding_components(model, params["components"])
    return {"explained_variance": variance.round(5).tolist()}, analysis.plot_components(components, variance)


def position_embedding(model: VisionTransformer) -> tuple[dict[str, Any], Figure]:
    similarity = analysis.position_similarity(model)
    rows, cols = similarity.shape[:2]
    flat = similarity.reshape(rows * cols, rows * cols)
    # the most similar other patch of each patch: its grid neighbours, if the embedding learned 2-D structure
    others = np.where(np.eye(rows * cols, dtype=bool), -np.inf, flat).argmax(axis=1)
    steps = np.abs(np.divmod(others, cols)[0] - np.arange(rows * cols) // cols) + np.abs(
        np.divmod(others, cols)[1] - np.arange(rows * cols) % cols
    )
    numbers = {"grid": [rows, cols], "most_similar_patch_is_a_neighbour": float(np.mean(steps == 1))}
    return numbers, analysis.plot_position_similarity(similarity)


def attention_distance(
    model: VisionTransformer, cache: datasets.Dataset, params: dict[str, Any]
) -> tuple[dict[str, Any], Figure]:
    distances = analysis.attention_distances(model, _images(model, cache, params, params["distance_images"]))
    numbers = {"mean_attention_distance_px": distances.round(3).tolist(), "images": params["distance_images"]}
    return numbers, analysis.plot_attention_distance(distances, model.config.image_size)


def attention_rollout(
    model: VisionTransformer, cache: datasets.Dataset, params: dict[str, Any]
) -> tuple[dict[str, Any], Figure]:
    images = _images(model, cache, params, params["rollout_images"])
    maps = analysis.rollout_maps(model, images)
    pixels = ((images.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    return {"rollout_maps": maps.round(5).tolist()}, analysis.plot_rollout(pixels, maps)


def report(model: VisionTransformer, **numbers: dict[str, Any]) -> dict[str, Any]:
    return {"model": model.config.to_dict(), **numbers}
