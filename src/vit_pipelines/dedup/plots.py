"""The figure people look at to trust a de-duplication run: matched pairs side by side."""

from __future__ import annotations

from matplotlib.figure import Figure
from PIL import Image


def plot_pairs(pairs: list[tuple[Image.Image, Image.Image, str]], title: str, columns: int = 4) -> Figure:
    """A grid of (query, reference, caption) pairs: each pair is two images side by side under its caption."""
    rows = max(1, -(-len(pairs) // columns))
    fig = Figure(figsize=(2.4 * columns, 1.45 * rows + 0.6))
    axes = fig.subplots(rows, 2 * columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (query, reference, caption) in enumerate(pairs):
        left, right = axes[k // columns, 2 * (k % columns)], axes[k // columns, 2 * (k % columns) + 1]
        left.imshow(query.convert("RGB"))
        right.imshow(reference.convert("RGB"))
        left.set_title(caption, fontsize=7, loc="left")
    if not pairs:
        axes[0, 0].text(0, 0.5, "no near-duplicates found", fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
