"""Position embeddings: fixed 2-D sin-cos (big_vision) and learned 2-D (App. D.4 of the paper), and resizing a
learned grid to a new resolution (§3.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def posemb_sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> torch.Tensor:
    """big_vision's `posemb_sincos_2d`: `[1, h*w, width]`, quarters sin(x), cos(x), sin(y), cos(y)."""
    h, w = grid
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    quarter = width // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    pe = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return pe[None].float()


class LearnedPosEmb2d(nn.Module):
    """Separate learned row and column embeddings of width D/2 each, concatenated per grid cell."""

    def __init__(self, grid: tuple[int, int], width: int) -> None:
        super().__init__()
        self.grid = grid
        self.row = nn.Parameter(torch.empty(1, grid[0], 1, width // 2).normal_(std=0.02))
        self.col = nn.Parameter(torch.empty(1, 1, grid[1], width // 2).normal_(std=0.02))

    def forward(self) -> torch.Tensor:
        h, w = self.grid
        pe = torch.cat([self.row.expand(-1, h, w, -1), self.col.expand(-1, h, w, -1)], dim=-1)
        return pe.reshape(1, h * w, -1)


# How each method calls F.interpolate. align_corners=True maps output index i to input coordinate
# i * (h - 1) / (H - 1), and to 0 when H == 1: scipy.ndimage.zoom's mapping for order=1 (grid_mode=False).
RESIZE_METHODS: dict[str, dict[str, object]] = {
    "zoom_bilinear": {"mode": "bilinear", "align_corners": True},  # vit_jax / big_vision
    "bicubic": {"mode": "bicubic", "align_corners": False, "antialias": True},  # timm
}


def resize_pos_embed(
    posemb: torch.Tensor,
    new_grid: int | tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
    method: str = "zoom_bilinear",
) -> torch.Tensor:
    """`[1, prefix + h*w, D]` → `[1, prefix + H*W, D]`: the (h, w) grid interpolated to `new_grid` (H, W).

    Prefix ([class]) tokens pass through unchanged. `old_grid=None` takes a square grid. `"zoom_bilinear"` equals
    `scipy.ndimage.zoom(grid, (H/h, W/w, 1), order=1)` as in vit_jax and big_vision; `"bicubic"` is timm's
    (antialiased, align_corners=False). Computed in float64, returned in `posemb`'s dtype.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"method must be one of {sorted(RESIZE_METHODS)}, got {method!r}")
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"posemb must be [1, prefix + h*w, D], got {tuple(posemb.shape)}")
    tokens = posemb.shape[1] - num_prefix_tokens
    if num_prefix_tokens < 0 or tokens < 1:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} leaves no grid in {posemb.shape[1]} tokens")
    if old_grid is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"{tokens} grid tokens are not a square grid; pass old_grid=(h, w)")
        old_grid = (side, side)
    new_grid = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    if old_grid[0] * old_grid[1] != tokens:
        raise ValueError(f"old_grid {tuple(old_grid)} does not hold the {tokens} grid tokens")
    if len(new_grid) != 2 or min(new_grid) < 1:
        raise ValueError(f"new_grid must be two positive sizes (H, W), got {new_grid}")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2).double()
    grid = F.interpolate(grid, size=new_grid, **RESIZE_METHODS[method])
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)
