"""Inside a trained ViT (paper §4.5, Fig. 6 and 7, App. D.7): what the patch embedding, the position embedding
and the attention have learned.

* `patch_embedding_components`: the top principal components of the patch-embedding filters (Fig. 7 left).
* `position_similarity`: cosine similarity of every patch's position embedding with every other (Fig. 7 centre).
* `mean_attention_distance`: per head, the image-space distance a query attends over (Fig. 7 right), in pixels.
* `attention_rollout`: attention mixed through all layers (Abnar & Zuidema 2020), the maps of Fig. 6.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from vit_pipelines.models.vit import VisionTransformer


def patch_embedding_components(model: VisionTransformer, count: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """(components `[count, P, P, 3]` each scaled to [0, 1] for display, explained variance ratio `[count]`):
    the right singular vectors of the centred `[D, 3·P·P]` filter matrix of the patch embedding."""
    if model.patch_embed.stem is not None:
        raise ValueError("a hybrid's patch embedding filters ResNet features, not pixels: nothing to draw")
    weight = model.patch_embed.proj.weight.detach().double()  # [D, 3, P, P]
    d, c, ph, pw = weight.shape
    flat = weight.reshape(d, -1)
    _, singular, vt = torch.linalg.svd(flat - flat.mean(dim=0), full_matrices=False)
    count = min(count, vt.shape[0])
    components = vt[:count].reshape(count, c, ph, pw).permute(0, 2, 3, 1).numpy()
    low = components.min(axis=(1, 2, 3), keepdims=True)
    high = components.max(axis=(1, 2, 3), keepdims=True)
    variance = (singular**2 / (singular**2).sum())[:count].numpy()
    return (components - low) / np.maximum(high - low, 1e-12), variance


def position_similarity(model: VisionTransformer) -> np.ndarray:
    """`[rows, cols, rows, cols]`: cosine similarity of each patch's position embedding with every patch's
    ([class] token excluded)."""
    embedding = model.position_embedding()
    if embedding is None:
        raise ValueError("the model has no position embedding (posemb='none')")
    rows, cols = model.config.grid_size
    patches = embedding.detach()[0, -rows * cols :].double()  # the prefix tokens come first
    unit = patches / patches.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).reshape(rows, cols, rows, cols).numpy()


def _patch_centres(grid: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([rows.flatten() * patch_size[0], cols.flatten() * patch_size[1]], dim=1).double()


def mean_attention_distance(
    attention: torch.Tensor, grid: tuple[int, int], patch_size: tuple[int, int], prefix: int = 1
) -> np.ndarray:
    """`attention` `[B, heads, prefix + N, prefix + N]` of one layer → `[heads]` mean attention distance in
    pixels: for every patch query, the distance between patch centres averaged with its attention weights over
    the patch keys (renormalised without the prefix tokens), then averaged over queries and images."""
    weights = attention[:, :, prefix:, prefix:].double()
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    centres = _patch_centres(grid, patch_size)
    distance = torch.cdist(centres, centres)  # [N, N] pixels
    return (weights * distance).sum(dim=-1).mean(dim=(0, 2)).numpy()


def attention_rollout(attention: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per layer `[B, heads, T, T]` → `[B, T, T]`: heads averaged, the residual path added as identity, rows
    renormalised, and the layers multiplied from the first to the last."""
    rollout = None
    for layer in attention:
        mixed = layer.double().mean(dim=1)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


def rollout_maps(model: VisionTransformer, images: torch.Tensor) -> np.ndarray:
    """`[B, rows, cols]`: how much each patch feeds the representation, through all layers: the rollout row of
    the [class] token, or the mean over patch rows for a model that pools patches ("gap")."""
    with torch.no_grad():
        attention = model.eval().forward_features(images, return_attention=True)["attention"]
    rollout = attention_rollout(attention)
    prefix = model.config.num_prefix_tokens
    relevance = rollout[:, 0, prefix:] if prefix else rollout.mean(dim=1)
    return relevance.reshape(len(images), *model.config.grid_size).numpy()


def attention_distances(model: VisionTransformer, images: torch.Tensor) -> np.ndarray:
    """`[layers, heads]` mean attention distance (pixels) over `images`."""
    with torch.no_grad():
        attention = model.eval().forward_features(images, return_attention=True)["attention"]
    prefix, config = model.config.num_prefix_tokens, model.config
    return np.stack(
        [mean_attention_distance(a, config.grid_size, config.patch_size, prefix) for a in attention]
    )


# ----------------------------------------------------------------------------------------------------- figures
def plot_components(components: np.ndarray, variance: np.ndarray) -> Figure:
    columns = 7
    rows = -(-len(components) // columns)
    fig = Figure(figsize=(1.3 * columns, 1.45 * rows + 0.5))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, component) in enumerate(zip(axes.flat, components, strict=False)):
        ax.imshow(component, interpolation="nearest")
        ax.set_title(f"{k + 1}: {variance[k]:.1%}", fontsize=7)
    fig.suptitle("Patch-embedding filters: principal components (explained variance)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_position_similarity(similarity: np.ndarray) -> Figure:
    """The paper's Fig. 7 (centre): tile (row, column) shows that patch's position embedding against every
    patch's, rows and columns numbered as in the image."""
    rows, cols = similarity.shape[:2]
    fig = Figure(figsize=(0.55 * cols + 1.8, 0.55 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={"wspace": 0.02, "hspace": 0.02})
    for r in range(rows):
        for c in range(cols):
            image = axes[r, c].imshow(similarity[r, c], vmin=-1, vmax=1, cmap="viridis")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    for c in range(cols):
        axes[-1, c].set_xlabel(str(c + 1), fontsize=7)
    for r in range(rows):
        axes[r, 0].set_ylabel(str(r + 1), fontsize=7, rotation=0, labelpad=6, va="center")
    fig.supxlabel("input patch column", fontsize=9)
    fig.supylabel("input patch row", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle("Position embedding similarity\n(each tile: one patch against all patches)", fontsize=9)
    return fig


def plot_attention_distance(distances: np.ndarray, image_size: tuple[int, int]) -> Figure:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    layers, heads = distances.shape
    for head in range(heads):
        ax.scatter(np.arange(1, layers + 1), distances[:, head], s=14, label=f"head {head + 1}")
    ax.set(
        xlabel="network depth (layer)",
        ylabel="mean attention distance (pixels)",
        ylim=(0, float(np.hypot(*image_size)) / 2),
        title="Attention distance per head",
    )
    ax.grid(alpha=0.3)
    if heads <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_rollout(images: np.ndarray, maps: np.ndarray) -> Figure:
    """`images` `[B, H, W, 3]` uint8 beside the rollout map upsampled over them."""
    count = len(images)
    fig = Figure(figsize=(1.6 * count, 3.5))
    axes = fig.subplots(2, count, squeeze=False)
    for k in range(count):
        axes[0, k].imshow(images[k])
        heat = np.kron(maps[k], np.ones((images.shape[1] // maps.shape[1], images.shape[2] // maps.shape[2])))
        axes[1, k].imshow(images[k])
        axes[1, k].imshow(heat / max(heat.max(), 1e-12), cmap="inferno", alpha=0.6)
        for ax in axes[:, k]:
            ax.axis("off")
    fig.suptitle("Attention rollout: what the representation attends to (bottom)", fontsize=9)
    fig.tight_layout()
    return fig
