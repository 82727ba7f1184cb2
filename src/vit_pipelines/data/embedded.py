"""Embedded default data, built offline and deterministically from package-shipped images.

* **pretrain** -- 40 balanced classes in six families: procedural shapes, rendered letters, crops of colour
  photos (class = source photo), procedural colour patterns, the quadrant holding one small object, and the
  number (2/4/8) of small objects. It also holds a known number of leaked, web-style transformed copies of
  downstream *test* images (see :func:`leaked_copies`), for the de-duplication stage to find.
* **digits** -- scikit-learn's 1,797 8x8 handwritten digits, upscaled to 80-100% of the image at a random
  place, in a random ink colour on a flat, gradient or smooth-noise background of contrasting luminance
  (like SVHN); 10 classes.
* **textures** -- crops of six grayscale scikit-image images (brick, grass, gravel, coins, printed text,
  handwriting); train and test crops come from disjoint regions of each image; class = source image.
* **counting** -- 1 to 6 small discs on a varied background; class = count.

Pretraining shares primitives with every downstream set (strokes and glyphs, textures, objects to count and
locate) but none of their source images. Every image comes from ``numpy.random.default_rng([seed, ...])``
keyed by its own index, so builds are byte-identical whatever the machine.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

EMBEDDED_VERSION: int = 1
DEFAULT_PRETRAIN_IMAGES: int = 24_000
DOWNSTREAM_NAMES: tuple[str, ...] = ("digits", "textures", "counting")
LEAKS_PER_DOWNSTREAM: int = 20
"""Leaked test copies per downstream set at ``DEFAULT_PRETRAIN_IMAGES``; scaled with ``num_images``."""

_SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "arrow", "crescent", "heart")
_LETTERS = tuple("ACEFHKMPRX")  # no letters that look like digits (O, I, S, Z, B, G)
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble", "china", "flower")
_PATTERNS = ("stripes", "checker", "dots", "blobs", "waves")
_POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right")
_COUNTS = ("2", "4", "8")
_PRETRAIN_CLASSES: tuple[tuple[str, str], ...] = (
    *(("shape", s) for s in _SHAPES),
    *(("letter", s) for s in _LETTERS),
    *(("photo", s) for s in _PHOTOS),
    *(("pattern", s) for s in _PATTERNS),
    *(("position", s) for s in _POSITIONS),
    *(("count", s) for s in _COUNTS),
)
PRETRAIN_CLASS_NAMES: tuple[str, ...] = tuple(f"{family}_{kind}" for family, kind in _PRETRAIN_CLASSES)

_TEXTURES = ("brick", "grass", "gravel", "coins", "printed_text", "handwriting")
_TEXTURE_SPLIT = 0.6  # train crops lie left of this fraction of the width, test crops right of it
_TEXTURE_PER_CLASS = {"train": 200, "test": 100}
_COUNTING_NAMES = ("one", "two", "three", "four", "five", "six")
_COUNTING_PER_CLASS = {"train": 200, "test": 100}
_DIGITS_TRAIN = 1000


def _tag(name: str) -> int:
    return zlib.crc32(name.encode())


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _features(names: tuple[str, ...]) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})


def _png(img: Image.Image) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes)


# --------------------------------------------------------------------------------------- source images
@lru_cache(maxsize=1)
def _photos() -> dict[str, Image.Image]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    arrays = {
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "motorcycle": skimage.data.stereo_motorcycle()[0],
        "hubble": skimage.data.hubble_deep_field(),
        "china": china,
        "flower": flower,
    }
    return {name: Image.fromarray(a).convert("RGB") for name, a in arrays.items()}


@lru_cache(maxsize=1)
def _texture_sources() -> dict[str, Image.Image]:
    import skimage.data

    arrays = {
        "brick": skimage.data.brick(),
        "grass": skimage.data.grass(),
        "gravel": skimage.data.gravel(),
        "coins": skimage.data.coins(),
        "printed_text": skimage.data.page(),
        "handwriting": skimage.data.text(),
    }
    return {name: Image.fromarray(a).convert("L") for name, a in arrays.items()}


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


@lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c)  # x (columns), y (rows), both in (0, 1)


# ------------------------------------------------------------------------------------- drawing helpers
def _lum(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _contrasting(rng: np.random.Generator, ref: np.ndarray, min_diff: float = 70.0) -> tuple[int, int, int]:
    """A random colour whose luminance differs from ``ref``'s by at least ``min_diff``."""
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        if abs(_lum(c) - _lum(ref)) >= min_diff:
            return tuple(int(v) for v in c)
    return (0, 0, 0) if _lum(ref) > 127 else (255, 255, 255)


def _smooth_noise(rng: np.random.Generator, cells: int, size: int, channels: int = 1) -> np.ndarray:
    """Bicubically upsampled ``cells`` x ``cells`` uniform noise in about [-1, 1], shape (size, size[, 3])."""
    noise = rng.integers(0, 256, (cells, cells, channels), dtype=np.uint8)
    small = Image.fromarray(noise[..., 0] if channels == 1 else noise)
    big = np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.float32)
    return big / 127.5 - 1


def _photo_crop(rng: np.random.Generator, name: str, size: int, frac: tuple[float, float]) -> np.ndarray:
    img = _photos()[name]
    side = rng.uniform(*frac) * min(img.size)
    x0, y0 = rng.uniform(0, img.width - side), rng.uniform(0, img.height - side)
    out = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side), reducing_gap=3.0)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.float32)


def _background(
    rng: np.random.Generator, size: int, photo: bool, factor: int = 2
) -> tuple[Image.Image, np.ndarray]:
    """Flat, gradient, smooth-noise or (if ``photo``) faded photo-crop background, and its mean colour.

    The canvas is ``factor`` times ``size`` wide: shapes are drawn at 2x and reduced, for anti-aliasing.
    """
    arr = _background_array(rng, size, photo)
    img = _to_image(arr)
    return img.resize((factor * size,) * 2, Image.BILINEAR) if factor > 1 else img, arr.mean(axis=(0, 1))


def _background_array(rng: np.random.Generator, size: int, photo: bool) -> np.ndarray:
    base = rng.uniform(0, 255, 3).astype(np.float32)
    kind = int(rng.integers(4 if photo else 3))
    if kind == 0:
        return np.broadcast_to(base, (size, size, 3)).copy()
    if kind == 1:
        x, y = _grid(size)
        t = rng.uniform(0, 2 * np.pi)
        u = x * np.cos(t) + y * np.sin(t)
        u = (u - u.min()) / (u.max() - u.min())
        other = rng.uniform(0, 255, 3).astype(np.float32)
        return base + (other - base) * u[..., None]
    if kind == 2:
        cells, amp = int(rng.integers(3, 9)), rng.uniform(20, 60)
        noise = _smooth_noise(rng, cells, size, channels=3)
        return np.clip(base + amp * noise, 0, 255)
    return 0.5 * _photo_crop(rng, _PHOTOS[int(rng.integers(len(_PHOTOS)))], size, (0.2, 0.6)) + 0.5 * base


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def _rotate(points: np.ndarray, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    c, s = np.cos(angle), np.sin(angle)
    xy = points @ np.array([[c, s], [-s, c]]) * r + (cx, cy)
    return [tuple(p) for p in xy]


def _regular(n: int, inner: float | None = None) -> np.ndarray:
    k = 2 * n if inner else n
    t = np.arange(k) * 2 * np.pi / k - np.pi / 2
    rad = np.where(np.arange(k) % 2 == 1, inner, 1.0) if inner else np.ones(k)
    return np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)


def _crescent() -> np.ndarray:
    h = np.linspace(-np.pi / 2, np.pi / 2, 24)
    return np.concatenate(
        [np.stack([-np.cos(h), np.sin(h)], 1), np.stack([-0.3 * np.cos(h), np.sin(h)], 1)[::-1]]
    )


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([16 * np.sin(t) ** 3, -y], 1) / 16


_CROSS = [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3)]
_UNIT_SHAPES: dict[str, np.ndarray] = {  # polygons of radius about 1, centred on the origin
    "square": _regular(4) * 1.1,
    "triangle": _regular(3) * 1.15,
    "hexagon": _regular(6),
    "star": _regular(5, inner=0.42) * 1.1,
    "cross": np.array(_CROSS + [(-x, -y) for x, y in _CROSS]),
    "arrow": np.array(
        [(-1, -0.2), (0.15, -0.2), (0.15, -0.55), (1, 0), (0.15, 0.55), (0.15, 0.2), (-1, 0.2)]
    ),
    "crescent": _crescent(),
    "heart": _heart(),
}


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, fill
) -> None:
    """Draw a filled shape of radius ``r`` (ring: an annulus) centred at ``(cx, cy)``."""
    if kind in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(
            box, outline=fill, fill=fill if kind == "circle" else None, width=max(1, round(0.35 * r))
        )
    else:
        draw.polygon(_rotate(_UNIT_SHAPES[kind], cx, cy, r, angle), fill=fill)


def _place(rng: np.random.Generator, radii: list[float], lo: float, hi: float) -> list[tuple[float, float]]:
    """Centres in [lo, hi]^2 (unit square) of discs of the given radii, apart by a gap (200 tries each)."""
    centres: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(200):
            p = rng.uniform(lo + r, hi - r, 2)
            if all(
                np.hypot(p[0] - q[0], p[1] - q[1]) > r + rq + 0.03
                for q, rq in zip(centres, radii[: len(centres)], strict=True)
            ):
                break
        centres.append((float(p[0]), float(p[1])))
    return centres


# --------------------------------------------------------------------------------- pretraining classes
def _draw_objects(
    rng: np.random.Generator, size: int, kinds: list[str], radii: list[float], box: tuple[float, float]
) -> Image.Image:
    """Background (no photo) with small objects at non-overlapping positions inside ``box`` (lo, hi)."""
    s2 = 2 * size
    canvas, ref = _background(rng, size, photo=False)
    draw = ImageDraw.Draw(canvas)
    for kind, r, (cx, cy) in zip(kinds, radii, _place(rng, radii, *box), strict=True):
        angle = rng.uniform(0, 2 * np.pi)
        _draw_shape(draw, kind, cx * s2, cy * s2, r * s2, angle, _contrasting(rng, ref))
    return canvas.reduce(2)


def _render_shape(rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    s2 = 2 * size
    canvas, ref = _background(rng, size, photo=True)
    r = rng.uniform(0.22, 0.4) * s2
    cx, cy = (0.5 + rng.uniform(-0.12, 0.12, 2)) * s2
    _draw_shape(ImageDraw.Draw(canvas), kind, cx, cy, r, rng.uniform(0, 2 * np.pi), _contrasting(rng, ref))
    return canvas.reduce(2)


def _render_letter(rng: np.random.Generator, char: str, size: int) -> Image.Image:
    canvas, ref = _background(rng, size, photo=True, factor=1)  # FreeType glyphs are anti-aliased already
    mask = Image.new("L", (size, size))
    font = _font(int(rng.uniform(0.5, 0.85) * size))
    stroke = int(rng.integers(0, 2))
    ImageDraw.Draw(mask).text(
        (size / 2, size / 2), char, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    dx, dy = rng.uniform(-0.12, 0.12, 2) * size
    mask = mask.rotate(rng.uniform(-25, 25), Image.BILINEAR, translate=(dx, dy))
    canvas.paste(_contrasting(rng, ref), mask=mask)
    return canvas


def _render_pattern(rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    x, y = _grid(size)
    t = rng.uniform(0, np.pi)
    u = (x - 0.5) * np.cos(t) + (y - 0.5) * np.sin(t)
    v = -(x - 0.5) * np.sin(t) + (y - 0.5) * np.cos(t)
    p = rng.uniform(0.12, 0.25)  # period, in image widths
    sharp = p * size / (2 * np.pi)  # ~1 pixel transitions for sine zero crossings
    if kind == "stripes":
        a = 0.5 + sharp * np.sin(2 * np.pi * u / p)
    elif kind == "checker":
        a = 0.5 + sharp * np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p)
    elif kind == "dots":
        d = np.hypot((u / p) % 1 - 0.5, (v / p) % 1 - 0.5) * p
        a = 0.5 + (rng.uniform(0.2, 0.35) * p - d) * size
    elif kind == "blobs":
        n = _smooth_noise(rng, int(rng.integers(4, 9)), size)
        a = 0.5 + (n - np.median(n)) * size / 4
    else:  # waves: two crossing sinusoids, continuous tone
        t2 = t + rng.uniform(np.pi / 4, 3 * np.pi / 4)
        w = (x - 0.5) * np.cos(t2) + (y - 0.5) * np.sin(t2)
        a = 0.5 + 0.25 * (np.sin(2 * np.pi * u / p) + np.sin(2 * np.pi * w / rng.uniform(0.12, 0.25)))
    a = np.clip(a, 0, 1)[..., None]
    c0 = rng.uniform(0, 255, 3)
    c1 = np.array(_contrasting(rng, c0, 90.0), dtype=np.float32)
    return _to_image(c0 + (c1 - c0) * a)


def _render_position(rng: np.random.Generator, quadrant: str, size: int) -> Image.Image:
    row, col = quadrant.split("_")
    r = rng.uniform(0.08, 0.12)
    img = _draw_objects(rng, size, [str(rng.choice(["circle", "square"]))], [r], (0.0, 0.5))
    # objects were placed in the top-left quadrant; flip into the requested one
    if col == "right":
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if row == "bottom":
        img = img.transpose(Image.FLIP_TOP_BOTTOM)
    return img


def _render_count(rng: np.random.Generator, count: str, size: int) -> Image.Image:
    n = int(count)
    kinds = [str(k) for k in rng.choice(["triangle", "star", "cross", "hexagon"], n)]
    return _draw_objects(rng, size, kinds, list(rng.uniform(0.055, 0.08, n)), (0.02, 0.98))


_RENDERERS: dict[str, Callable[[np.random.Generator, str, int], Image.Image]] = {
    "shape": _render_shape,
    "letter": _render_letter,
    "photo": lambda rng, name, size: _to_image(_photo_crop(rng, name, size, (0.15, 0.5))),
    "pattern": _render_pattern,
    "position": _render_position,
    "count": _render_count,
}


def pretrain_labels(num_images: int = DEFAULT_PRETRAIN_IMAGES, seed: int = 0) -> np.ndarray:
    """Labels of ``build_pretrain(num_images, seed=seed)`` (balanced over ``PRETRAIN_CLASS_NAMES``)."""
    return _balanced_labels(num_images, len(PRETRAIN_CLASS_NAMES), _rng(seed, _tag("pretrain-labels")))


# ----------------------------------------------------------------------------------- downstream sets
@dataclass(frozen=True)
class _Downstream:
    class_names: tuple[str, ...]
    labels: dict[str, np.ndarray]  # split -> labels
    render: Callable[[str, int, int], Image.Image]  # (split, index, image_size) -> image


def _digits_set(seed: int) -> _Downstream:
    from sklearn.model_selection import train_test_split

    images, target = _digits()
    train, test = train_test_split(
        np.arange(len(target)), train_size=_DIGITS_TRAIN, stratify=target, random_state=seed
    )
    index = {"train": train, "test": test}

    def render(split: str, i: int, size: int) -> Image.Image:
        rng = _rng(seed, _tag("digits"), _tag(split), i)
        small = Image.fromarray((images[index[split][i]] * (255 / 16)).astype(np.uint8), mode="L")
        side = int(rng.uniform(0.8, 1.0) * size)
        x, y = rng.integers(0, size - side + 1, 2)
        background = _background_array(rng, size, photo=False)
        canvas = _to_image(background)
        ink = _contrasting(rng, background.mean(axis=(0, 1)), 90.0)
        canvas.paste(ink, (int(x), int(y)), small.resize((side, side), Image.BICUBIC))
        return canvas

    return _Downstream(tuple(str(d) for d in range(10)), {s: target[ix] for s, ix in index.items()}, render)


def _textures_set(seed: int) -> _Downstream:
    labels = {
        s: _balanced_labels(n * len(_TEXTURES), len(_TEXTURES), _rng(seed, _tag("textures"), _tag(s)))
        for s, n in _TEXTURE_PER_CLASS.items()
    }

    def render(split: str, i: int, size: int) -> Image.Image:
        rng = _rng(seed, _tag("textures"), _tag(split), i)
        img = _texture_sources()[_TEXTURES[labels[split][i]]]
        lo, hi = (0.0, _TEXTURE_SPLIT) if split == "train" else (_TEXTURE_SPLIT, 1.0)
        side = rng.uniform(40, 100)
        x0 = rng.uniform(lo * img.width, hi * img.width - side)
        y0 = rng.uniform(0, img.height - side)
        out = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
        for _ in range(int(rng.integers(4))):
            out = out.transpose(Image.ROTATE_90)
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return out.convert("RGB")

    return _Downstream(_TEXTURES, labels, render)


def _counting_set(seed: int) -> _Downstream:
    k = len(_COUNTING_NAMES)
    labels = {
        s: _balanced_labels(n * k, k, _rng(seed, _tag("counting"), _tag(s)))
        for s, n in _COUNTING_PER_CLASS.items()
    }

    def render(split: str, i: int, size: int) -> Image.Image:
        rng = _rng(seed, _tag("counting"), _tag(split), i)
        n = int(labels[split][i]) + 1
        return _draw_objects(rng, size, ["circle"] * n, list(rng.uniform(0.06, 0.09, n)), (0.02, 0.98))

    return _Downstream(_COUNTING_NAMES, labels, render)


_DOWNSTREAM: dict[str, Callable[[int], _Downstream]] = {
    "digits": _digits_set,
    "textures": _textures_set,
    "counting": _counting_set,
}


def build_downstream(name: str, image_size: int = 64, seed: int = 0) -> datasets.DatasetDict:
    """Downstream set ``name`` (one of ``DOWNSTREAM_NAMES``) with disjoint "train" and "test" splits."""
    if name not in _DOWNSTREAM:
        raise ValueError(f"unknown downstream set {name!r}; expected one of {DOWNSTREAM_NAMES}")
    spec = _DOWNSTREAM[name](seed)
    features = _features(spec.class_names)
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    "image": [_png(spec.render(split, i, image_size)) for i in range(len(labels))],
                    "label": labels.tolist(),
                },
                features=features,
            )
            for split, labels in spec.labels.items()
        }
    )


# ------------------------------------------------------------------------------------- leaked copies
@dataclass(frozen=True)
class _Leak:
    pretrain_index: int
    downstream: str
    test_index: int
    crop: tuple[float, float, float, float]  # fraction removed: left, top, right, bottom
    scale: tuple[float, float]  # resize factors (x, y)
    flip: bool
    brightness: float
    contrast: float
    saturation: float
    gray: bool
    border: float  # border width, fraction of the side (0: none)
    border_shade: int  # grey level of the border
    quality: int

    def describe(self) -> str:
        parts = [
            "crop(l={:.2f},t={:.2f},r={:.2f},b={:.2f})".format(*self.crop),
            "resize({:.2f}x,{:.2f}x)".format(*self.scale),
            *(["hflip"] if self.flip else []),
            f"color(b={self.brightness:.2f},c={self.contrast:.2f},s={self.saturation:.2f})",
            *(["grayscale"] if self.gray else []),
            *([f"border({self.border:.2f},{self.border_shade})"] if self.border else []),
            f"jpeg(q={self.quality})",
        ]
        return "+".join(parts)

    def apply(self, img: Image.Image) -> Image.Image:
        """Web-style copy of ``img``, returned at ``img``'s size."""
        w, h = img.size
        left, top, right, bottom = self.crop
        out = img.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))
        out = out.resize((max(8, round(w * self.scale[0])), max(8, round(h * self.scale[1]))), Image.BILINEAR)
        if self.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        out = ImageEnhance.Brightness(out).enhance(self.brightness)
        out = ImageEnhance.Contrast(out).enhance(self.contrast)
        out = ImageEnhance.Color(out).enhance(self.saturation)
        if self.gray:
            out = out.convert("L").convert("RGB")
        if self.border:
            width = max(1, round(self.border * out.width))
            out = ImageOps.expand(out, border=width, fill=(self.border_shade,) * 3)
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=self.quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize((w, h), Image.BILINEAR)


def _leaks_per_downstream(num_images: int) -> int:
    if num_images < 100:
        return 0
    return max(1, round(LEAKS_PER_DOWNSTREAM * num_images / DEFAULT_PRETRAIN_IMAGES))


def _leak_plan(num_images: int, seed: int) -> list[_Leak]:
    n = _leaks_per_downstream(num_images)
    rng = _rng(seed, _tag("leaks"))
    positions = rng.choice(num_images, size=n * len(DOWNSTREAM_NAMES), replace=False)
    leaks = []
    for j, name in enumerate(DOWNSTREAM_NAMES):
        n_test = len(_DOWNSTREAM[name](seed).labels["test"])
        for pos, test_index in zip(
            positions[j * n : (j + 1) * n], rng.choice(n_test, size=n, replace=False), strict=True
        ):
            removed, split = rng.uniform(0, 0.1, 2), rng.random(2)  # fraction cut per axis, share on left/top
            scale = float(rng.uniform(0.5, 2.0))
            aspect = rng.uniform(0.75, 1.33) if rng.random() < 0.5 else 1.0
            leaks.append(
                _Leak(
                    pretrain_index=int(pos),
                    downstream=name,
                    test_index=int(test_index),
                    crop=tuple(float(c) for c in (*(removed * split), *(removed * (1 - split)))),
                    scale=(scale, float(np.clip(scale * aspect, 0.5, 2.0))),
                    flip=bool(rng.random() < 0.5),
                    brightness=float(rng.uniform(0.75, 1.25)),
                    contrast=float(rng.uniform(0.75, 1.25)),
                    saturation=float(rng.uniform(0.5, 1.5)),
                    gray=bool(rng.random() < 0.25),
                    border=float(rng.uniform(0.01, 0.04)) if rng.random() < 0.3 else 0.0,
                    border_shade=int(rng.choice([0, 255, int(rng.integers(256))])),
                    quality=int(rng.integers(30, 96)),
                )
            )
    return sorted(leaks, key=lambda leak: leak.pretrain_index)


def leaked_copies(num_images: int = DEFAULT_PRETRAIN_IMAGES, seed: int = 0) -> list[dict]:
    """The leaked downstream test copies inside ``build_pretrain(num_images, seed=seed)``, by pretrain index.

    ``test_index`` indexes ``build_downstream(downstream, image_size, seed)["test"]`` (same seed and size as
    the pretraining build). Each copy keeps the label of the pretraining slot it replaces.
    """
    return [
        {
            "pretrain_index": leak.pretrain_index,
            "downstream": leak.downstream,
            "test_index": leak.test_index,
            "transform": leak.describe(),
        }
        for leak in _leak_plan(num_images, seed)
    ]


# --------------------------------------------------------------------------------------- pretraining set
def build_pretrain(
    num_images: int = DEFAULT_PRETRAIN_IMAGES, image_size: int = 64, seed: int = 0
) -> datasets.Dataset:
    """The pretraining set: ``num_images`` balanced images over ``PRETRAIN_CLASS_NAMES``, with leaked copies."""
    if num_images < 1:
        raise ValueError("num_images must be positive")
    labels = pretrain_labels(num_images, seed)
    leaks = {leak.pretrain_index: leak for leak in _leak_plan(num_images, seed)}
    specs = {name: _DOWNSTREAM[name](seed) for name in {leak.downstream for leak in leaks.values()}}
    images = []
    for i, label in enumerate(labels):
        if i in leaks:
            leak = leaks[i]
            img = leak.apply(specs[leak.downstream].render("test", leak.test_index, image_size))
        else:
            family, kind = _PRETRAIN_CLASSES[label]
            img = _RENDERERS[family](_rng(seed, _tag("pretrain"), i), kind, image_size)
        images.append(_png(img))
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels.tolist()}, features=_features(PRETRAIN_CLASS_NAMES)
    )
