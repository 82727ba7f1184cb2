"""Image → canonical square, resampled boxes of it, and the measures compared in `index.py`.

Every image is decoded once and resampled to a `CANONICAL` x `CANONICAL` square in three planes: luminance
(0..255) and the two chroma planes Cb, Cr (centred on 0). Size and aspect ratio are normalised away. All later
geometry is a *box* in that square's unit coordinates, `(cx, cy, sx, sy)`: centre and size as fractions of the
side. A box may reach past the square (edge pixels repeat).

* `dct_descriptors`: the lowest 8x8 DCT frequencies (DC dropped, unit norm) of the luminance in a box.
  Robust to JPEG, blur and brightness/contrast (mean and scale removed) and blind to colour; a horizontal
  flip only changes the signs of the odd horizontal frequencies (`FLIP_SIGNS`).
* `detail_views`: boxes with their plane removed and blurred by a fine minus a coarse Gaussian (band pass),
  which removes smooth backgrounds and gradients (they make distinct images look alike at low frequencies) and
  pixel noise, leaving the edges and blobs that tell images apart.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from scipy import fft, ndimage

from vit_pipelines.data.ops import BadImageError, open_image

CANONICAL = 64  # side of the canonical square, pixels
DESCRIPTOR_GRID = 32  # a box is resampled to this many pixels a side before its DCT
DCT_BLOCK = 8  # the lowest DCT_BLOCK x DCT_BLOCK frequencies are kept, DC dropped: 63 dimensions
MIN_SIDE = 8  # pixels; smaller images carry too little to compare

_U, _V = np.meshgrid(np.arange(DCT_BLOCK), np.arange(DCT_BLOCK))  # horizontal, vertical frequency
_KEEP = (_U + _V) > 0
_DCT_BASIS = fft.dct(np.eye(DESCRIPTOR_GRID), norm="ortho", axis=0)[:DCT_BLOCK].astype(np.float32)  # [8, 32]
FLIP_SIGNS = np.where(_U % 2 == 1, -1.0, 1.0)[_KEEP].astype(np.float32)
"""[63]: a box's descriptor times this is the descriptor of the box flipped left-right."""


def canonical(value: Any) -> np.ndarray:
    """Bytes, an HF `{"bytes", "path"}` dict, a path or a PIL image → float32 [3, CANONICAL, CANONICAL]:
    luminance 0..255, Cb and Cr centred on 0. Raises `BadImageError` ("empty", "corrupt", "too_large", "too_small")."""
    image = _decode(value)
    if min(image.size) < MIN_SIDE:
        raise BadImageError("too_small", f"{image.size[0]}x{image.size[1]}")
    try:
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # scale 16/32-bit values into 8 bits
            array = np.asarray(image, dtype=np.float32)
            image = PIL.Image.fromarray(
                (255 * array / max(float(array.max()), 1e-6)).clip(0, 255).astype(np.uint8)
            )
        square = image.convert("RGB").resize((CANONICAL, CANONICAL), PIL.Image.BILINEAR, reducing_gap=2.0)
    except (OSError, ValueError) as err:  # truncated data can surface only when pixels are read
        raise BadImageError("corrupt", str(err)) from err
    planes = np.asarray(square.convert("YCbCr"), dtype=np.float32).transpose(2, 0, 1).copy()
    planes[1:] -= 128.0
    return planes


def _decode(value: Any) -> PIL.Image.Image:
    """`open_image`, except that encoded JPEGs decode at a reduced scale (`draft`): several times faster."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if (
        value is None
        or isinstance(value, PIL.Image.Image)
        or (isinstance(value, bytes | bytearray) and not value)
    ):
        return open_image(value)[0]  # PIL images as they are, and the error for empty input
    if not isinstance(value, bytes | bytearray | str | Path):
        kind = type(value).__name__
        raise TypeError(
            f"an image must be a PIL image, encoded bytes, a {{'bytes', 'path'}} dict or a path: {kind}"
        )
    try:
        image = PIL.Image.open(io.BytesIO(value) if isinstance(value, bytes | bytearray) else value)
        image.draft("RGB", (2 * CANONICAL, 2 * CANONICAL))
        image.load()
    except PIL.Image.DecompressionBombError as err:
        raise BadImageError("too_large", str(err)) from err
    except Exception as err:  # PIL raises many kinds on truncated or foreign data
        raise BadImageError("corrupt", str(err)) from err
    return image


@lru_cache(maxsize=1 << 14)
def _resample_matrix(n_in: int, n_out: int, start: float, size: float) -> np.ndarray:
    """[n_out, n_in] weights resampling n_in pixels over [start, start + size] (unit coordinates) to n_out
    pixels: a triangle filter, widened when shrinking (antialiased); past the ends, edge pixels repeat."""
    scale = max(size * n_in / n_out, 1.0)  # input pixels per output pixel, at least 1
    centres = (start + (np.arange(n_out) + 0.5) * size / n_out) * n_in - 0.5  # in input pixel coordinates
    radius = int(np.ceil(scale))
    taps = np.floor(centres)[:, None] + np.arange(1 - radius, radius + 1)[None, :]
    weights = np.clip(1.0 - np.abs(taps - centres[:, None]) / scale, 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    matrix = np.zeros((n_out, n_in), np.float32)
    columns = np.clip(taps, 0, n_in - 1).astype(int)
    for k in range(taps.shape[1]):  # one tap per row at a time, so repeated edge columns accumulate
        matrix[np.arange(n_out), columns[:, k]] += weights[:, k]
    matrix.flags.writeable = False  # shared through the cache
    return matrix


def axis_matrix(side: int, grid: int, centre: float, size: float) -> np.ndarray:
    """[grid, side]: resamples one axis of `side` pixels over `centre` ± `size` / 2 (unit coordinates)."""
    centre, size = round(float(centre), 4), round(float(size), 4)  # rounded: nearby spans share the cache
    return _resample_matrix(side, grid, centre - size / 2, size)


def box_matrices(box: np.ndarray, side: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [grid, side], cols [grid, side]): `rows @ image @ cols.T` is `box` of a [side, side] image."""
    cx, cy, sx, sy = box
    return axis_matrix(side, grid, cy, sy), axis_matrix(side, grid, cx, sx)


def view(images: np.ndarray, box: np.ndarray, grid: int) -> np.ndarray:
    """[..., C, C] → `box` resampled to [..., grid, grid]."""
    rows, cols = box_matrices(box, images.shape[-1], grid)
    return rows @ images @ cols.T


def dct_descriptors(luma: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """luma [N, C, C], boxes [V, 4] → unit-norm descriptors [N, V, 63]; all zero where a box is flat.

    Resampling and the truncated DCT are both linear, so each box costs one [8, C] matrix per axis.
    """
    out = []
    for box in boxes:
        rows, cols = box_matrices(box, luma.shape[-1], DESCRIPTOR_GRID)
        out.append(((_DCT_BASIS @ rows) @ luma @ (_DCT_BASIS @ cols).T)[:, _KEEP])
    return unit(np.stack(out, axis=1), min_norm=1.0)


@lru_cache(maxsize=16)
def _smoothing(grid: int, sigma: float) -> np.ndarray:
    """[grid, grid] Gaussian blur of one axis (reflecting at the ends) as a matrix."""
    return ndimage.gaussian_filter1d(np.eye(grid, dtype=np.float32), sigma, axis=0, mode="reflect")


@lru_cache(maxsize=16)
def _ramp_response(grid: int, sigmas: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(ramp [grid] centred on 0, band pass of the horizontal ramp image [grid, grid])."""
    ramp = np.arange(grid, dtype=np.float32) - (grid - 1) / 2
    image = np.broadcast_to(ramp, (grid, grid))
    fine, coarse = (_smoothing(grid, s) for s in sigmas)
    return ramp, fine @ image @ fine.T - coarse @ image @ coarse.T


Span = tuple[float, float]  # (centre, size) of a box along one axis, unit coordinates


def detail_views(
    images: np.ndarray, xs: list[Span], ys: list[Span], grid: int, sigmas: tuple[float, float]
) -> np.ndarray:
    """[..., C, C] → [..., len(ys), len(xs), grid, grid]: every box (x span, y span) resampled to grid²
    with its best-fitting plane removed, then band-passed (fine minus coarse Gaussian, sigmas in grid pixels).

    The band pass sees only the box (a copy's border stays out); removing the plane first keeps a gradient
    from lighting up the box's edges. All boxes cost a few matrix products (both axes are separable).
    """
    side = images.shape[-1]
    cols = np.stack([axis_matrix(side, grid, c, s) for c, s in xs])  # [nx, grid, side]
    rows = np.stack([axis_matrix(side, grid, c, s) for c, s in ys])  # [ny, grid, side]
    fine, coarse = (_smoothing(grid, s) for s in sigmas)
    band = [(f @ rows).reshape(-1, side) @ images @ (f @ cols).reshape(-1, side).T for f in (fine, coarse)]
    views = (band[0] - band[1]).reshape(*images.shape[:-2], len(ys), grid, len(xs), grid).swapaxes(-3, -2)
    ramp, response = _ramp_response(grid, sigmas)
    scale = grid * float(ramp @ ramp)  # least-squares slope = <view, ramp image> / <ramp image, ramp image>
    slope_x = (rows.sum(1) @ images @ (ramp @ cols).T) / scale  # [..., ny, nx]
    slope_y = ((ramp @ rows) @ images @ cols.sum(1).T) / scale
    return views - slope_x[..., None, None] * response - slope_y[..., None, None] * response.T


def unit(x: np.ndarray, min_norm: float) -> np.ndarray:
    """x / ||x|| along the last axis (float32); all zero where the norm is below `min_norm`."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    scale = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm >= min_norm)
    return (x * scale).astype(np.float32, copy=False)


def patterns(images: np.ndarray, min_std: float) -> np.ndarray:
    """[..., H, W] → mean-removed unit patterns [..., H*W] (dot product = Pearson correlation); all zero
    where the standard deviation is below `min_std` (a blank image matches nothing)."""
    flat = images.reshape(*images.shape[:-2], -1)
    flat = flat - flat.mean(axis=-1, keepdims=True)
    return unit(flat, min_norm=min_std * np.sqrt(flat.shape[-1]))
