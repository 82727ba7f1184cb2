"""Frozen representations (`pre_logits`) of a cached image set, kept on disk per (weights, data, pp).

Under `accelerate launch` every rank extracts its contiguous share of the rows on its own device, and all
ranks receive every share, in order: the features of one process, for 1/N of the forward passes each."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from vit_pipelines.data.loader import content_fingerprint, eval_batches
from vit_pipelines.models.vit import VisionTransformer
from vit_pipelines.training.loop import (
    gather_lists,
    process_state,
    rank_share,
    resolve_mixed_precision,
    shares_per_rank,
)
from vit_pipelines.training.sharding import idle_forwards, is_sharded, placeholder_images
from vit_pipelines.workers import writer_id

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    model: VisionTransformer, cache: datasets.Dataset, pp: str, batch_size: int = 256, desc: str = "features"
) -> tuple[np.ndarray, np.ndarray]:
    """`pre_logits` `[N, D or rep]` float32 and labels `[N]` for every row of `cache`, in order; each rank
    computes its share (collective: every rank must call it)."""
    state = process_state()
    rank, world = state.process_index, state.num_processes
    share = cache.select(rank_share(len(cache), rank, world))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bf16 = resolve_mixed_precision("auto", device) == "bf16"
    features = [np.empty((0, model.head.in_features), np.float32)]  # a rank with no rows
    labels = [np.empty(0, np.int64)]
    batches = eval_batches(share, pp, batch_size, device) if len(share) else iter(())
    bar = tqdm(batches, desc=desc, total=-(-len(share) // batch_size), leave=False, disable=rank != 0)
    for batch in bar:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.forward_features(batch["images"], tokens=False)["pre_logits"]
        features.append(out.float().cpu().numpy())
        labels.append(batch["labels"].cpu().numpy().astype(np.int64))
    # every rank runs as many forward passes as the others: they gather a sharded model's weights together
    if is_sharded(model):
        for _ in range(idle_forwards(shares_per_rank(len(cache)), batch_size, rank)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                model.forward_features(placeholder_images(model, device), tokens=False)
    model.train(was_training)
    mine = (np.concatenate(features), np.concatenate(labels))
    if world == 1:
        return mine
    shares = gather_lists([mine])  # rank order: the rows in order
    return np.concatenate([f for f, _ in shares]), np.concatenate([y for _, y in shares])


def weights_fingerprint(model: VisionTransformer) -> str:
    """A short hash of the model's config and weights: the same checkpoint gives the same key."""
    digest = hashlib.sha1(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_features(
    model: VisionTransformer,
    cache: datasets.Dataset,
    pp: str,
    folder: str | Path,
    name: str,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """`extract_features`, stored as `folder/<name>-<key>.npz` with key = hash(weights, pp, rows) and reused."""
    key = hashlib.sha1(f"{weights_fingerprint(model)}|{pp}|{content_fingerprint(cache)}".encode()).hexdigest()
    path = Path(folder) / f"{name}-{key[:16]}.npz"
    if all(gather_lists([path.exists()])):  # every rank must take the same branch: extraction is collective
        with np.load(path, allow_pickle=False) as stored:
            return stored["features"], stored["labels"]
    features, labels = extract_features(model, cache, pp, batch_size, desc=name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{writer_id()}.npz")  # ranks may write the same features
    np.savez(tmp, features=features, labels=labels)
    tmp.replace(path)
    return features, labels
