"""A copy-detection benchmark built offline from images shipped in scikit-image and scikit-learn.

`originals()` are distinct images in groups, each with hard negatives inside it: whole photos, crops of
the same photos that overlap little, handwritten digits of the same class drawn identically (only the
handwriting differs), crops of the same textures, faces, and low-detail images: one object on a plain
background (`template`), 1-6 discs (`count`), edge tiles of round photos (`symmetric`), skies and star fields
(`sky`, `stars`). `distractors()` are more images of the same kinds, distinct from every original: the same
template with another shape, colour or place, the discs with one moved or one more or fewer, the tile on the
other side mirrored, other skies and other places of the star field. `TRANSFORMS` maps each family of web alterations to a seeded function;
`combined` applies all of them with random parameters, as the embedded default's leaked copies do.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import skimage.data
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from sklearn.datasets import load_digits, load_sample_images

Transform = Callable[[Image.Image, np.random.Generator], Image.Image]

_PHOTOS = ("astronaut", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "immunohistochemistry",
           "moon", "retina", "rocket", "hubble_deep_field", "page", "text", "cell", "microaneurysms", "logo",
           "horse", "shepp_logan_phantom", "checkerboard")  # fmt: skip
_CROPPED = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "china", "flower")
_TEXTURES = ("grass", "gravel", "brick")
_MAX_OVERLAP = 0.25  # distinct crops of one photo share at most this fraction of the smaller crop
_MAX_DIGIT_CORRELATION = 0.8  # distinct digits of one class: 8x8 bitmaps correlate less than this


def _rgb(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        array = (255 * (array.astype(np.float64) / max(float(array.max()), 1e-9))).astype(np.uint8)
    image = Image.fromarray(array)
    return image.convert("RGB")


def _fit(image: Image.Image, side: int) -> Image.Image:
    """Shrink so that the longer side is at most `side` pixels (keeps the aspect ratio)."""
    image = image.copy()
    image.thumbnail((side, side), Image.BICUBIC)
    return image


@lru_cache(maxsize=1)
def _sources() -> dict[str, Image.Image]:
    china, flower = load_sample_images().images
    images = {name: _rgb(getattr(skimage.data, name)()) for name in _PHOTOS + _TEXTURES}
    images |= {
        "china": _rgb(china),
        "flower": _rgb(flower),
        "motorcycle": _rgb(skimage.data.stereo_motorcycle()[0]),
    }
    return images


def _crop_boxes(rng: np.random.Generator, size: tuple[int, int], count: int) -> list[tuple[int, ...]]:
    """`count` square boxes (25-50% of the short side) that pairwise overlap at most `_MAX_OVERLAP`."""
    w, h = size
    boxes: list[tuple[int, ...]] = []
    while len(boxes) < count:
        side = int(rng.uniform(0.25, 0.5) * min(w, h))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        box = (x, y, x + side, y + side)
        if all(_overlap(box, other) <= _MAX_OVERLAP for other in boxes):
            boxes.append(box)
    return boxes


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _crops(names: tuple[str, ...], per_source: int, side: int, seed: int) -> list[list[Image.Image]]:
    """Per source, `per_source` low-overlap crops resized to `side` pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        image = _sources()[name]
        out.append(
            [
                image.resize((side, side), Image.BICUBIC, box=box)
                for box in _crop_boxes(rng, image.size, per_source)
            ]
        )
    return out


def _distinct_digits(per_class: int, seed: int) -> list[list[np.ndarray]]:
    """Per digit class, `per_class` 8x8 bitmaps whose pairwise correlation is below the limit."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    out = []
    for label in range(10):
        chosen: list[np.ndarray] = []
        for i in rng.permutation(np.flatnonzero(digits.target == label)):
            bitmap = digits.images[i]
            if all(np.corrcoef(bitmap.ravel(), c.ravel())[0, 1] < _MAX_DIGIT_CORRELATION for c in chosen):
                chosen.append(bitmap)
            if len(chosen) == per_class:
                break
        out.append(chosen)
    return out


def _draw_digit(bitmap: np.ndarray, label: int) -> Image.Image:
    """Every digit of one class drawn the same way (ink, paper, place): only the handwriting differs."""
    rng = np.random.default_rng(label)
    luminance = np.array([0.299, 0.587, 0.114])
    paper = rng.integers(0, 256, 3)
    ink = next(c for c in rng.integers(0, 256, (100, 3)) if abs((c - paper) @ luminance) >= 90)  # legible
    mask = Image.fromarray((bitmap * (255 / 16)).astype(np.uint8)).resize((84, 84), Image.BICUBIC)
    canvas = Image.new("RGB", (96, 96), tuple(int(c) for c in paper))
    canvas.paste(tuple(int(c) for c in ink), (6, 6), mask)
    return canvas


def _faces(count: int) -> list[Image.Image]:
    faces = skimage.data.lfw_subset()[:count]  # the first 100 are faces, the rest are not
    return [_rgb(f).resize((80, 80), Image.BICUBIC) for f in faces]


_SHAPES = ("disc", "square", "triangle")


def _draw(canvas: Image.Image, shape: str, centre: tuple[float, float], radius: float, fill) -> None:
    """A filled shape drawn at 4x and reduced (anti-aliased), as a photo of it would be."""
    side = canvas.width
    big = canvas.resize((4 * side, 4 * side), Image.NEAREST)
    x, y, r = 4 * centre[0] * side, 4 * centre[1] * side, 4 * radius * side
    draw = ImageDraw.Draw(big)
    if shape == "disc":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
    canvas.paste(big.resize((side, side), Image.BOX))


def _colour(rng: np.random.Generator, far_from: np.ndarray | None = None) -> tuple[int, int, int]:
    """A random colour; with `far_from`, one whose luminance differs from it by at least 60 levels."""
    luminance = np.array([0.299, 0.587, 0.114])
    while True:
        c = rng.integers(0, 256, 3)
        if far_from is None or abs((c - far_from) @ luminance) >= 60:
            return tuple(int(v) for v in c)


def _templates(count: int, seed: int) -> list[Image.Image]:
    """Per template (one object on a plain background): it, then the same with another shape, moved by 15%
    of the side, and with an object of another colour."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        paper = np.array(_colour(rng))
        ink = _colour(rng, far_from=paper)
        shape, radius = str(rng.choice(_SHAPES)), float(rng.uniform(0.07, 0.12))
        centre = tuple(float(c) for c in rng.uniform(0.25, 0.75, 2))
        moved = (centre[0] + 0.15 * rng.choice([-1, 1]), centre[1])
        other = str(rng.choice([s for s in _SHAPES if s != shape]))
        recoloured = _colour(rng, far_from=np.array(ink))
        for variant in (
            (shape, centre, ink),
            (other, centre, ink),
            (shape, moved, ink),
            (shape, centre, recoloured),
        ):
            canvas = Image.new("RGB", (96, 96), tuple(int(c) for c in paper))
            _draw(canvas, variant[0], variant[1], radius, variant[2])
            out.append(canvas)
    return out


def _disc_sets(count: int, seed: int) -> list[Image.Image]:
    """Per set of 1-6 discs of one colour on a plain background, apart: it, one disc moved by 20% of the side
    towards the middle, and one disc fewer (one more for a single disc)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        paper = np.array(_colour(rng))
        ink, n = _colour(rng, far_from=paper), k % 6 + 1
        centres: list[tuple[float, float]] = []
        while len(centres) < n + 1:
            c = tuple(float(v) for v in rng.uniform(0.15, 0.85, 2))
            if all(np.hypot(c[0] - o[0], c[1] - o[1]) > 0.25 for o in centres):
                centres.append(c)
        x, y = centres[0]
        moved = [(x + (0.2 if x < 0.5 else -0.2), y)] + centres[1:n]
        fewer_or_more = centres[: n - 1] if n > 1 else centres[:2]
        for discs in (centres[:n], moved, fewer_or_more):
            canvas = Image.new("RGB", (96, 96), tuple(int(c) for c in paper))
            for centre in discs:
                _draw(canvas, "disc", centre, 0.07, ink)
            out.append(canvas)
    return out


def _edge_tiles(names: tuple[str, ...], side: int) -> list[Image.Image]:
    """Per round photo and side (left, top): the edge tile, then the opposite tile mirrored onto it."""
    out = []
    for name in names:
        image = _sources()[name]
        w, h = image.size
        t = min(w, h) // 3
        top, left = (h - t) // 2, (w - t) // 2
        for tile, opposite, mirror in (
            ((0, top, t, top + t), (w - t, top, w, top + t), Image.FLIP_LEFT_RIGHT),
            ((left, 0, left + t, t), (left, h - t, left + t, h), Image.FLIP_TOP_BOTTOM),
        ):
            out.append(image.resize((side, side), Image.BICUBIC, box=tile))
            out.append(image.resize((side, side), Image.BICUBIC, box=opposite).transpose(mirror))
    return out


def _skies(count: int, seed: int) -> list[Image.Image]:
    """Blue-to-pale gradients with faint smooth clouds, each its own."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        top, bottom = (
            rng.uniform([20, 60, 150], [90, 140, 230]),
            rng.uniform([150, 180, 210], [220, 230, 255]),
        )
        ramp = np.linspace(0, 1, 96)[:, None, None] ** rng.uniform(0.6, 1.6)
        cells = rng.random((4, 4))
        clouds = np.asarray(Image.fromarray((255 * cells).astype(np.uint8)).resize((96, 96), Image.BICUBIC))
        sky = top + (bottom - top) * ramp + rng.uniform(10, 25) * (clouds[..., None] / 255.0)
        out.append(Image.fromarray(sky.clip(0, 255).astype(np.uint8)))
    return out


@lru_cache(maxsize=1)
def _pools() -> dict[str, list[Image.Image]]:
    """Every image of the benchmark by group; `originals` and `distractors` split each group."""
    crops = _crops(_CROPPED, 6, 128, seed=1)
    textures = _crops(_TEXTURES, 6, 96, seed=2)
    digits = _distinct_digits(5, seed=3)
    return {
        "photo": [_fit(_sources()[n], 256) for n in _PHOTOS + ("china", "flower", "motorcycle")],
        "photo_crop": [c for per in crops for c in per],
        "texture": [c for per in textures for c in per],
        "digit": [_draw_digit(b, label) for label, per in enumerate(digits) for b in per],
        "face": _faces(40),
        "template": _templates(8, seed=4),
        "count": _disc_sets(12, seed=5),
        "symmetric": _edge_tiles(("retina", "coffee"), 96),
        "sky": _skies(12, seed=6),
        "stars": [c for per in _crops(("hubble_deep_field",), 10, 96, seed=7) for c in per],
    }


def _split(keep: Callable[[int, str], bool]) -> list[tuple[str, Image.Image]]:
    return [
        (group, image)
        for group, images in _pools().items()
        for i, image in enumerate(images)
        if keep(i, group)
    ]


_EVERY = {"template": (4, 1), "count": (3, 1), "symmetric": (2, 1), "sky": (1, 0), "stars": (2, 1)}
"""group: (n, k): the first k of every n images are originals, the others their hard negatives. Skies are
negatives only: with next to no detail, a sky's copies cannot be told from other skies."""


def _is_original(i: int, group: str) -> bool:
    """Crops and textures: 4 of each source's 6; digits: 3 of each class's 5; faces: the first 30; all photos;
    `_EVERY` for the low-detail groups."""
    if group in ("photo_crop", "texture"):
        return i % 6 < 4
    if group == "digit":
        return i % 5 < 3
    if group in _EVERY:
        return i % _EVERY[group][0] < _EVERY[group][1]
    return group == "photo" or i < 30


def originals() -> list[tuple[str, Image.Image]]:
    """(group, image) of the reference images: about 160 distinct images with hard negatives in each group."""
    return _split(_is_original)


def distractors() -> list[tuple[str, Image.Image]]:
    """(group, image) of images of the same kinds as `originals()`, none of them a copy of one."""
    return _split(lambda i, group: group != "photo" and not _is_original(i, group))


# ------------------------------------------------------------------------------------------ transformations
def jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    quality = 30 if rng.random() < 0.4 else int(rng.integers(30, 96))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def resize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    sx = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    sy = float(np.clip(sx * rng.uniform(0.75, 1.33), 0.5, 2.0)) if rng.random() < 0.5 else sx
    size = (max(8, round(image.width * sx)), max(8, round(image.height * sy)))
    return image.resize(size, (Image.BILINEAR, Image.BICUBIC, Image.LANCZOS)[int(rng.integers(3))])


def crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    (cut_x, cut_y), (share_x, share_y) = rng.uniform(0, 0.1, 2), rng.random(2)
    left, top = round(w * cut_x * share_x), round(h * cut_y * share_y)
    return image.crop((left, top, w - round(w * cut_x * (1 - share_x)), h - round(h * cut_y * (1 - share_y))))


def flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose(Image.FLIP_LEFT_RIGHT)


def color(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.5))


def grayscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.convert("L").convert("RGB")


def border(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    width = max(1, round(rng.uniform(0.01, 0.04) * max(image.size)))
    fill = [(0, 0, 0), (255, 255, 255), (128, 128, 128), tuple(int(c) for c in rng.integers(0, 256, 3))]
    return ImageOps.expand(image, border=width, fill=fill[int(rng.integers(4))])


def combined(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """All families in the embedded default's order: crop, resize, colour, flip?, grey?, border?, JPEG."""
    image = color(resize(crop(image, rng), rng), rng)
    image = flip(image, rng) if rng.random() < 0.5 else image
    image = grayscale(image, rng) if rng.random() < 0.25 else image
    image = border(image, rng) if rng.random() < 0.3 else image
    return jpeg(image, rng)


TRANSFORMS: dict[str, Transform] = {
    "jpeg": jpeg, "resize": resize, "crop": crop, "flip": flip, "color": color, "grayscale": grayscale,
    "border": border, "combined": combined,
}  # fmt: skip
