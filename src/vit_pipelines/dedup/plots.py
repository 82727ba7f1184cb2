"""The figure people look at to trust a de-duplication run: matched pairs side by side."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def plot_pairs(pairs: list[tuple[Image.Image, Image.Image, str]], title: str, columns: int = 4) -> plt.Figure:
    """A grid of (query, reference, caption) pairs: each pair is two images side by side under its caption."""
    rows = max(1, -(-len(pairs) // columns))
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2.4 * columns, 1.45 * rows + 0.6), squeeze=False)
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
