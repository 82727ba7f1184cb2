"""Preprocessing as a tiny language, big_vision style: `"decode|inception_crop(32)|flip_lr|value_range(-1,1)"`.

Each op is a factory registered by name; called with the spec's arguments it returns a function
`(image, rng) -> image`. `decode` turns encoded bytes or a PIL image into a uint8 tensor `[3, H, W]`; every
other op takes and returns a `[C, H, W]` tensor. Random ops draw from the `numpy.random.Generator` they are
given, so a run is reproducible from its seed whatever the number of workers.
"""

from __future__ import annotations

import ast
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

Op = Callable[[Any, np.random.Generator], Any]
PP_OPS: dict[str, Callable[..., Op]] = {}


class BadImageError(ValueError):
    """An input that cannot become an image; `reason` is one of "empty", "corrupt", "too_small"."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def register(name: str) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
    def wrap(factory: Callable[..., Op]) -> Callable[..., Op]:
        PP_OPS[name] = factory
        return factory

    return wrap


def parse_pp(spec: str) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """`"resize(32)|flip_lr"` → `[("resize", (32,), {}), ("flip_lr", (), {})]`; arguments are Python literals."""
    ops = []
    for part in filter(None, (p.strip() for p in spec.split("|"))):
        try:
            call = ast.parse(part if "(" in part else f"{part}()", mode="eval").body
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
                raise SyntaxError
            args = tuple(ast.literal_eval(a) for a in call.args)
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except (SyntaxError, ValueError) as err:
            raise ValueError(f"cannot parse pp op {part!r} in {spec!r}") from err
        if call.func.id not in PP_OPS:
            raise ValueError(f"unknown pp op {call.func.id!r}; known: {sorted(PP_OPS)}")
        ops.append((call.func.id, args, kwargs))
    return ops


DEVICE_OPS = ("value_range",)  # element-wise on a whole batch: run on the accelerator after a uint8 copy


def split_pp(spec: str) -> tuple[str, str]:
    """`spec` as (host part, device part): the trailing `DEVICE_OPS` move to the device, so batches leave the
    loader workers as uint8 (a quarter of float32's bytes). `"inception_crop(32)|flip_lr|value_range(-1,1)"`
    → `("inception_crop(32)|flip_lr", "value_range(-1,1)")`."""
    parts = [p.strip() for p in spec.split("|") if p.strip()]
    names = [name for name, _, _ in parse_pp(spec)]
    host = len(parts)
    while host and names[host - 1] in DEVICE_OPS:
        host -= 1
    return "|".join(parts[:host]), "|".join(parts[host:])


def _fuse(ops: list[tuple[str, tuple, dict]]) -> list[tuple[str, tuple, dict]]:
    """`decode|inception_crop(…)` → `decode_inception_crop(…)`: the same crop, decoded only as far as it needs."""
    fused: list[tuple[str, tuple, dict]] = []
    for name, args, kwargs in ops:
        if name == "inception_crop" and fused and fused[-1][0] == "decode":
            _, decode_args, decode_kwargs = fused.pop()
            min_size = dict(zip(("min_size",), decode_args, strict=False)) | decode_kwargs
            fused.append(("decode_inception_crop", args, kwargs | min_size))
        else:
            fused.append((name, args, kwargs))
    return fused


def build_pp(spec: str) -> Op:
    """Compile a pp spec into one function `(image, rng) -> image`."""
    ops = [PP_OPS[name](*args, **kwargs) for name, args, kwargs in _fuse(parse_pp(spec))]

    def apply(image: Any, rng: np.random.Generator) -> Any:
        for op in ops:
            image = op(image, rng)
        return image

    return apply


def _size2(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def open_image(value: Any, load: bool = True) -> tuple[PIL.Image.Image, str]:
    """Bytes, a `{"bytes", "path"}` dict (HF `Image` feature undecoded), a path or a PIL image → (image, mode).
    With `load=False` only the header is read (size, mode and format known, pixels not yet decoded)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if value is None or (isinstance(value, bytes | bytearray) and len(value) == 0):
        raise BadImageError("empty")
    if isinstance(value, PIL.Image.Image):
        image = value
    else:
        try:
            image = PIL.Image.open(io.BytesIO(value) if isinstance(value, bytes | bytearray) else value)
            if load:
                image.load()
        except PIL.Image.DecompressionBombError as err:
            raise BadImageError("too_large", str(err)) from err
        except Exception as err:  # PIL raises many kinds on truncated or foreign data
            raise BadImageError("corrupt", str(err)) from err
    return image, image.mode


def to_rgb_image(image: PIL.Image.Image, min_size: int = 4) -> PIL.Image.Image:
    """Any PIL image → 8-bit RGB: grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images converted;
    a side below `min_size` pixels raises `BadImageError`."""
    if min(image.size) < min_size:
        raise BadImageError("too_small", f"{image.size[0]}x{image.size[1]}")
    try:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # scale 16/32-bit integers into 8 bits first
            array = np.asarray(image, dtype=np.float64)
            image = PIL.Image.fromarray((array * 255.0 / max(array.max(), 1.0)).astype(np.uint8))
        elif image.mode == "F":
            array = np.asarray(image, dtype=np.float64)
            image = PIL.Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8))
        return image if image.mode == "RGB" else image.convert("RGB")
    except OSError as err:  # a truncated file surfaces when its pixels are first read
        raise BadImageError("corrupt", str(err)) from err


def _as_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


@register("decode")
def decode(min_size: int = 4) -> Op:
    """Any PIL-readable input → uint8 RGB `[3, H, W]` (see `to_rgb_image`)."""
    return lambda value, rng: _as_tensor(to_rgb_image(open_image(value)[0], min_size))


@register("to_rgb")
def to_rgb() -> Op:
    """1 channel → 3 (repeated); 4 channels → the first 3."""

    def op(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]

    return op


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[
        0
    ]
    return out.round_().clamp_(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else out


@register("resize")
def resize(size: int | tuple[int, int]) -> Op:
    """Resize to exactly `size` (int → square), bilinear with antialiasing."""
    target = _size2(size)
    return lambda image, rng: _resize(image, target)


@register("resize_small")
def resize_small(size: int) -> Op:
    """Resize so the shorter side is `size`, keeping the aspect ratio."""

    def op(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        h, w = image.shape[-2:]
        scale = size / min(h, w)
        return _resize(image, (max(size, round(h * scale)), max(size, round(w * scale))))

    return op


def _crop(image: torch.Tensor, top: int, left: int, size: tuple[int, int]) -> torch.Tensor:
    return image[:, top : top + size[0], left : left + size[1]]


def _check_fits(image: torch.Tensor, size: tuple[int, int], op: str) -> None:
    if image.shape[-2] < size[0] or image.shape[-1] < size[1]:
        raise ValueError(f"{op}{size} needs an image at least that large, got {tuple(image.shape[-2:])}")


@register("central_crop")
def central_crop(size: int | tuple[int, int]) -> Op:
    target = _size2(size)

    def op(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        _check_fits(image, target, "central_crop")
        h, w = image.shape[-2:]
        return _crop(image, (h - target[0]) // 2, (w - target[1]) // 2, target)

    return op


@register("random_crop")
def random_crop(size: int | tuple[int, int]) -> Op:
    target = _size2(size)

    def op(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        _check_fits(image, target, "random_crop")
        h, w = image.shape[-2:]
        return _crop(
            image, int(rng.integers(h - target[0] + 1)), int(rng.integers(w - target[1] + 1)), target
        )

    return op


def _inception_box(
    h: int, w: int, area_min: float, area_max: float, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering `area_min`–`area_max` % of an `h` x `w` image with aspect
    ratio in [3/4, 4/3] (Szegedy et al.; big_vision's `inception_crop`); the whole image after 10 tries."""
    for _ in range(10):
        area = h * w * rng.uniform(area_min, area_max) / 100
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch, cw = round(math.sqrt(area / ratio)), round(math.sqrt(area * ratio))
        if 0 < ch <= h and 0 < cw <= w:
            return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw
    return 0, 0, h, w


@register("inception_crop")
def inception_crop(size: int | tuple[int, int], area_min: float = 5, area_max: float = 100) -> Op:
    """A random crop (see `_inception_box`) resized to `size`."""
    target = _size2(size)

    def op(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        top, left, ch, cw = _inception_box(*image.shape[-2:], area_min, area_max, rng)
        return _resize(_crop(image, top, left, (ch, cw)), target)

    return op


@register("decode_inception_crop")
def decode_inception_crop(
    size: int | tuple[int, int], area_min: float = 5, area_max: float = 100, min_size: int = 4
) -> Op:
    """`decode|inception_crop(size)` in one step: the crop is drawn on the header's size, a JPEG is decoded
    only at the DCT scale the crop needs (`draft`), and PIL crops and resizes in one antialiased pass."""
    th, tw = _size2(size)

    def op(value: Any, rng: np.random.Generator) -> torch.Tensor:
        image, _ = open_image(value, load=False)
        w, h = image.size
        top, left, ch, cw = _inception_box(h, w, area_min, area_max, rng)
        if image.format == "JPEG":  # the largest 1/2^k reduction that keeps the crop at least `size`
            image.draft("RGB", (math.ceil(w * tw / cw), math.ceil(h * th / ch)))
        scale_x, scale_y = image.size[0] / w, image.size[1] / h
        image = to_rgb_image(image, min_size)
        box = (left * scale_x, top * scale_y, (left + cw) * scale_x, (top + ch) * scale_y)
        return _as_tensor(image.resize((tw, th), PIL.Image.BILINEAR, box=box))

    return op


@register("flip_lr")
def flip_lr(p: float = 0.5) -> Op:
    """Mirror left-right with probability `p`."""
    return lambda image, rng: image.flip(-1) if rng.random() < p else image


@register("value_range")
def value_range(vmin: float = -1.0, vmax: float = 1.0, in_min: float = 0.0, in_max: float = 255.0) -> Op:
    """Linearly map [in_min, in_max] to [vmin, vmax] as float32."""
    scale = (vmax - vmin) / (in_max - in_min)
    return lambda image, rng: (image.float() - in_min) * scale + vmin
