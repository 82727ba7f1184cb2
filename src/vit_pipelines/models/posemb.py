"""Position embeddings: fixed 2-D sin-cos (big_vision) and learned 2-D (App. D.4 of the paper)."""

from __future__ import annotations

import torch
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
