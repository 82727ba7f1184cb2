"""Stage 3, the copy model: is an aligned candidate the same picture, or only a look-alike?

Stage 2 finds where a query sits in a test image and how well their band-passed luminance agrees, which
two different pictures of one small object on a plain background can do as well as a copy. A copy, though,
is its original under the alterations of the web, and each leaves a trace that can be checked:

* brightness and contrast map the original's luminance to the copy's by one line of positive slope, the
  *luma gain* (0.75-1.25 each: 0.56-1.56); the background's gradient and shading come along;
* they scale its chroma by the same factor, and saturation multiplies it by 0.5-1.5 more: the chroma keeps
  its direction (the *hue*) and is scaled by one factor everywhere, the object's colours as the background's
  (the *colour residual* measures what one factor cannot explain where the content is);
* the content keeps its shape: the luminance gradients where the content is point the same way (*shape*).

The fewer pixels hold content (the *detail* area), the fewer chances two different pictures have to
disagree, so low-detail images must agree in shape more closely. All measures are taken at `GRID` pixels
over the query's central box and the reference's aligned box; docs/dedup.md has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vit_pipelines.dedup.fingerprint import view

GRID = 32  # side of the compared views, pixels
LUMA_GAIN = (0.55, 1.65)  # brightness x contrast, 0.75-1.25 each, with slack
SATURATION = (0.4, 1.7)  # chroma gain over luma gain: saturation 0.5-1.5, with slack
MIN_LUMA_CORRELATION = 0.94  # the luminance as it is, background and shading included
MIN_HUE = 0.965  # cosine of the chroma planes: about 15 degrees
MAX_COLOUR_RESIDUAL = 0.45  # chroma one factor cannot explain where the content is, over its luma contrast
MIN_CHROMA = 4.0  # RMS chroma (levels) below which a query is grey: only its luminance is compared
SHAPE_SIGMA = 1.0  # Gaussian derivative scale of the gradients, pixels of GRID
CONTENT_LEVEL = 0.2  # content: gradient magnitude above this fraction of the image's largest ...
CONTENT_MARGIN = 2  # ... and this many pixels around it
SHAPE_FOR_DETAIL = ((0.15, 0.99), (0.3, 0.9))
"""(detail area, least shape correlation): 0.99 up to 15% of the box holding content, 0.9 from 30%, linear
between."""
CERTAIN_SCORE = 0.95  # `certain`: a stage-2 score of at least this, ...
CERTAIN_MARGIN = 0.01  # ... a shape that clears its limit by this much, ...
CERTAIN_DETAIL = 0.3  # ... and this much of the box holding content: a low-detail match is always borderline


@dataclass(frozen=True)
class CopyEvidence:
    """What the copy model says of one aligned (query, reference) pair."""

    luma: float  # Pearson correlation of the luminance as it is
    gain: float  # least-squares slope from the reference's luminance to the query's
    shape: float  # cosine of the luminance gradients where the content is
    detail: float  # fraction of the box holding content
    hue: float  # cosine of the chroma planes (1 for a grey query)
    saturation: float | None  # chroma gain over luma gain (None for a grey query)
    colour_residual: float  # see the module docstring (0 for a grey query)

    @property
    def least_shape(self) -> float:
        return least_shape(self.detail)

    def failures(self) -> list[str]:
        """The checks this pair fails; none for a copy."""
        failed = []
        if self.luma < MIN_LUMA_CORRELATION:
            failed.append("luma")
        if not LUMA_GAIN[0] <= self.gain <= LUMA_GAIN[1]:
            failed.append("gain")
        if self.shape < self.least_shape:
            failed.append("shape")
        if self.hue < MIN_HUE:
            failed.append("hue")
        if self.saturation is not None and not SATURATION[0] <= self.saturation <= SATURATION[1]:
            failed.append("saturation")
        if self.colour_residual > MAX_COLOUR_RESIDUAL:
            failed.append("colour_residual")
        return failed


def certain(score: float, evidence: CopyEvidence | None) -> bool:
    """Whether a match of stage-2 `score` (and, with the copy model on, `evidence`) is certain, not
    borderline: see `CERTAIN_SCORE`, `CERTAIN_MARGIN`, `CERTAIN_DETAIL`."""
    return score >= CERTAIN_SCORE and (
        evidence is None
        or (evidence.detail >= CERTAIN_DETAIL and evidence.shape >= evidence.least_shape + CERTAIN_MARGIN)
    )


def least_shape(detail: float) -> float:
    """The shape correlation a copy must reach when `detail` of its box holds content."""
    (few, strict), (many, loose) = SHAPE_FOR_DETAIL
    return float(np.interp(detail, [few, many], [strict, loose]))


def copy_evidence(query: np.ndarray, reference: np.ndarray, box: np.ndarray, central: float) -> CopyEvidence:
    """query, reference: canonical planes [3, C, C] (query already mirrored when matched so); box: the
    reference's aligned frame (cx, cy, sx, sy) whose central `central` part faces the query's."""
    q = view(query, np.array([0.5, 0.5, central, central], np.float32), GRID)
    r = view(reference, np.array([box[0], box[1], central * box[2], central * box[3]], np.float32), GRID)
    qy, ry = q[0] - q[0].mean(), r[0] - r[0].mean()
    luma = _cosine(qy, ry)
    gain = float((qy * ry).sum() / max(float((ry * ry).sum()), 1e-9))

    gradients = [_gradient(v[0]) for v in (q, r)]
    content = np.zeros((GRID, GRID), bool)
    for g in gradients:
        magnitude = np.hypot(*g)
        content |= magnitude > CONTENT_LEVEL * max(float(magnitude.max()), 1e-9)
    content = ndimage.binary_dilation(content, iterations=CONTENT_MARGIN)
    shape, detail = _cosine(gradients[0][:, content], gradients[1][:, content]), float(content.mean())

    qb, rb = (ndimage.gaussian_filter(v, (0, SHAPE_SIGMA, SHAPE_SIGMA)) for v in (q, r))  # JPEG blurs chroma
    qc, rc = qb[1:], rb[1:]
    if np.sqrt(np.mean(qc**2)) < MIN_CHROMA:
        return CopyEvidence(luma, gain, shape, detail, 1.0, None, 0.0)
    chroma_gain = float((qc * rc).sum() / max(float((rc * rc).sum()), 1e-9))
    qr, rr = (c[:, content] - c[:, content].mean(axis=1, keepdims=True) for c in (qc, rc))
    contrast = float(qb[0][content].std())
    residual = np.sqrt(np.mean(np.sum((qr - chroma_gain * rr) ** 2, axis=0))) / max(contrast, 1e-6)
    return CopyEvidence(
        luma, gain, shape, detail, _cosine(qc, rc), chroma_gain / max(gain, 1e-9), float(residual)
    )


def _gradient(luma: np.ndarray) -> np.ndarray:
    """[G, G] → [2, G, G]: Gaussian derivatives along x and y."""
    return np.stack([ndimage.gaussian_filter(luma, SHAPE_SIGMA, order=o) for o in ((0, 1), (1, 0))])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / max(float(np.sqrt((a * a).sum() * (b * b).sum())), 1e-9))
