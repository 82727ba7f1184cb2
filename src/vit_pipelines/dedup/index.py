"""An index over the (few) reference images, searched batch by batch with the (many) query images.

Geometry: a copy cropped by at most 10% per axis and given a border of at most 4% shows its original's frame
shifted by at most 5% and scaled by 0.9-1.08 per axis: the search covers `SHIFT_RANGE` and, with a little
slack, `SCALE_RANGE`.

Stage 1, retrieval: each reference is described through `STAGE1_BOXES` (a 3x3x3 grid over that range) in both
orientations, a query once through its central box (`CENTRAL`: a border falls outside it). The best cosine of
the DCT descriptors over boxes and orientations keeps at most `max_candidates` references per query above
`candidate_threshold`.

Stage 2, verification: first colour, then structure. Brightness, contrast and saturation scale chroma by
one positive factor, so the chroma of a coloured copy points the same way as its original's, as a whole and
at its colour edges (`colour_agreement`; a grey query is not compared, and a copy never gains colour its
original lacks). Then the query's band-passed central box is correlated with the reference's band-passed
luminance through boxes that a coarse-to-fine search over shift and scale (each axis apart) refines from the
best stage-1 box. The best Pearson correlation is the score.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from vit_pipelines.dedup.fingerprint import FLIP_SIGNS, Span, dct_descriptors, detail_views, patterns, view

CENTRAL = 0.84  # side of a query's compared central box; a border of up to 8% of the side falls outside it
SHIFT_RANGE = 0.05  # largest offset searched between a copy's frame centre and its original's (fraction)
SCALE_RANGE = (0.88, 1.1)  # sizes of a copy's frame in its original's searched, per axis
STAGE1_BOXES = np.array(
    [(0.5 + dx, 0.5 + dy, CENTRAL * s, CENTRAL * s)
     for s, dx, dy in itertools.product((0.92, 1.0, 1.08), (-0.04, 0.0, 0.04), (-0.04, 0.0, 0.04))],
    dtype=np.float32,
)  # fmt: skip
"""[27, 4] reference boxes (cx, cy, sx, sy) compared with a query's central box."""
DETAIL_GRID = 32  # side of the band-passed luminance patterns correlated in stage 2, pixels
DETAIL_SIGMAS = (0.75, 3.0)  # their band pass: fine and coarse Gaussian sigma, DETAIL_GRID pixels
DETAIL_POWER = 0.7  # signed power of the band-passed values before correlating (`_detail_patterns`)
MIN_DETAIL_STD = 0.3  # grey levels: with less band-passed detail an image is blank and matches nothing
COLOUR_GRID = 8  # side of the chroma patterns compared in stage 2, pixels
COLOUR_SIGMAS = (0.5, 2.0)  # band pass of the colour edges, COLOUR_GRID pixels
COLOUR_EDGE_WEIGHT = 2.0  # colour edges against the colours as a whole, in the colour agreement
MIN_CHROMA = 4.0  # RMS chroma (levels) below which a query is grey and its colours are not compared
_SEARCH_STEPS = ((0.02, 0.04), (0.01, 0.02), (0.005, 0.01))  # stage 2: (shift, scale) step of each round
_CENTRAL: Span = (0.5, CENTRAL)
_CENTRAL_BOX = np.array([0.5, 0.5, CENTRAL, CENTRAL], np.float32)


@dataclass(frozen=True)
class Candidate:
    query: int  # position in the batch
    reference: int  # position in the index
    flip: bool  # the query matches the reference mirrored
    box: np.ndarray  # [4] the stage-1 reference box (cx, cy, sx, sy) matching the query's central box
    similarity: float  # stage-1 cosine


def colour_pattern(chroma: np.ndarray, box: np.ndarray) -> np.ndarray:
    """[..., 2, C, C] Cb, Cr → [..., 4 * COLOUR_GRID²]: the box's chroma, then its colour edges (weighted)."""
    cx, cy, sx, sy = (float(b) for b in box)
    whole = view(chroma, box, COLOUR_GRID).reshape(*chroma.shape[:-3], -1)
    edges = detail_views(chroma, [(cx, sx)], [(cy, sy)], COLOUR_GRID, COLOUR_SIGMAS).reshape(
        *chroma.shape[:-3], -1
    )
    return np.concatenate([whole, COLOUR_EDGE_WEIGHT * edges], axis=-1)


@dataclass(frozen=True)
class Queries:
    """What both stages need of a batch of canonical queries [B, 3, C, C]."""

    descriptors: np.ndarray  # [B, 63] central-box DCT descriptors
    detail: np.ndarray  # [B, 2, DETAIL_GRID²] band-passed central-box patterns, upright and mirrored
    colour: np.ndarray  # [B, 2, 4 * COLOUR_GRID²] central-box `colour_pattern`, upright and mirrored

    @classmethod
    def from_canonical(cls, canonical: np.ndarray) -> Queries:
        luma, chroma = canonical[:, 0], canonical[:, 1:]
        detail = detail_views(luma, [_CENTRAL], [_CENTRAL], DETAIL_GRID, DETAIL_SIGMAS)[:, 0, 0]  # [B, g, g]
        mirrored = chroma[..., ::-1]  # the central box is symmetric: mirroring the image mirrors the box
        return cls(
            descriptors=dct_descriptors(luma, _CENTRAL_BOX[None])[:, 0],
            detail=_detail_patterns(np.stack([detail, detail[..., ::-1]], axis=1)),
            colour=np.stack(
                [colour_pattern(chroma, _CENTRAL_BOX), colour_pattern(mirrored, _CENTRAL_BOX)], 1
            ),
        )


class ReferenceIndex:
    """Both stages' data for the reference images (about 60 KB each): `candidates`, then `verify`."""

    def __init__(self, canonical: np.ndarray, ids: np.ndarray | None = None) -> None:
        """canonical: [R, 3, C, C] float32 (`fingerprint.canonical`); ids: [R] what matches report for each
        reference (default: its position)."""
        if len(canonical) == 0:
            raise ValueError("the reference index needs at least one reference image")
        self.ids = np.arange(len(canonical)) if ids is None else np.asarray(ids)
        self.luma, self.chroma = canonical[:, 0].copy(), canonical[:, 1:].copy()  # [R, C, C], [R, 2, C, C]
        whole = detail_views(self.luma, [(0.5, 1.0)], [(0.5, 1.0)], DETAIL_GRID, DETAIL_SIGMAS)[:, 0, 0]
        blank = ~_detail_patterns(whole).any(1)
        upright = dct_descriptors(self.luma, STAGE1_BOXES)  # [R, 27, 63]
        upright[blank] = 0.0  # a blank reference matches nothing
        # rows ordered (reference, box, orientation): divmod recovers them
        self.descriptors = np.stack([upright, upright * FLIP_SIGNS], axis=2).reshape(-1, upright.shape[-1])

    def __len__(self) -> int:
        return len(self.luma)

    def candidates(
        self, queries: Queries, candidate_threshold: float, max_candidates: int, chunk: int = 1 << 22
    ) -> list[Candidate]:
        """Stage 1: up to `max_candidates` references per query, best first. Similarities are computed about
        `chunk` at a time (queries x references x boxes x orientations), so memory stays bounded."""
        per_ref = 2 * len(STAGE1_BOXES)
        refs_per_chunk = max(1, chunk // (per_ref * max(1, len(queries.descriptors))))
        found: list[tuple[int, float, int, int]] = []  # (query, similarity, reference, row of the reference)
        for start in range(0, len(self), refs_per_chunk):
            block = self.descriptors[start * per_ref : (start + refs_per_chunk) * per_ref]
            sims = (queries.descriptors @ block.T).reshape(len(queries.descriptors), -1, per_ref)
            best_row, best = sims.argmax(axis=2), sims.max(axis=2)  # [B, refs]
            for q, r in zip(*np.nonzero(best >= candidate_threshold), strict=True):
                found.append((int(q), float(best[q, r]), start + int(r), int(best_row[q, r])))
        found.sort(key=lambda f: (f[0], -f[1]))
        out = []
        for _, group in itertools.groupby(found, key=lambda f: f[0]):
            for q, sim, r, row in itertools.islice(group, max_candidates):
                box, flip = divmod(row, 2)
                out.append(Candidate(q, r, bool(flip), STAGE1_BOXES[box], sim))
        return out

    def verify(self, queries: Queries, candidate: Candidate, colour_threshold: float) -> tuple[float, float]:
        """Stage 2: (score, colour agreement). The score is 0 for a blank query or when the colours disagree
        (the luminance search is then skipped); else the best correlation found by the search."""
        pattern = queries.detail[candidate.query, int(candidate.flip)]
        colour = self.colour_agreement(queries.colour[candidate.query, int(candidate.flip)], candidate)
        if not pattern.any() or colour < colour_threshold:
            return 0.0, colour
        luma = self.luma[candidate.reference]
        x = (float(candidate.box[0]), float(candidate.box[2]) / CENTRAL)  # (centre, scale) of each axis
        y = (float(candidate.box[1]), float(candidate.box[3]) / CENTRAL)
        score = -1.0
        for shift_step, scale_step in _SEARCH_STEPS:
            xs, ys = _axis_options(*x, shift_step, scale_step), _axis_options(*y, shift_step, scale_step)
            scores = _grid_correlations(luma, xs, ys, pattern)  # [len(ys), len(xs)]
            iy, ix = np.unravel_index(int(scores.argmax()), scores.shape)
            x, y, score = xs[ix], ys[iy], float(scores[iy, ix])
        return score, colour

    def colour_agreement(self, query: np.ndarray, candidate: Candidate) -> float:
        """Cosine of the query's `colour_pattern` and the reference's in the candidate's box (1: grey query).
        The reference's norm is floored at a third of a coloured query's least (copies scale chroma by at most
        ~3x), so a grey reference scores near 0."""
        whole = query[: query.size // 2]
        floor = MIN_CHROMA * np.sqrt(whole.size)  # an RMS of MIN_CHROMA levels
        if np.linalg.norm(whole) < floor:
            return 1.0
        reference = colour_pattern(self.chroma[candidate.reference], candidate.box)
        return float(
            query @ reference / (np.linalg.norm(query) * max(float(np.linalg.norm(reference)), floor / 3))
        )


def _axis_options(
    centre: float, scale: float, shift_step: float, scale_step: float
) -> list[tuple[float, float]]:
    """The 3x3 (centre, scale) neighbourhood of one axis, clipped to the searched range."""
    return [
        (
            float(np.clip(centre + dc, 0.5 - SHIFT_RANGE, 0.5 + SHIFT_RANGE)),
            float(np.clip(scale + ds, *SCALE_RANGE)),
        )
        for dc in (-shift_step, 0.0, shift_step)
        for ds in (-scale_step, 0.0, scale_step)
    ]


def _grid_correlations(luma: np.ndarray, xs: list[Span], ys: list[Span], pattern: np.ndarray) -> np.ndarray:
    """Correlations [len(ys), len(xs)] of `pattern` with `luma` [C, C] seen through every pair of frame spans
    (their central parts, as the query's)."""
    xs, ys = [(c, CENTRAL * s) for c, s in xs], [(c, CENTRAL * s) for c, s in ys]
    return _detail_patterns(detail_views(luma, xs, ys, DETAIL_GRID, DETAIL_SIGMAS)) @ pattern


def _detail_patterns(views: np.ndarray) -> np.ndarray:
    """Band-passed views [..., g, g] → unit patterns [..., g²] after a signed power `DETAIL_POWER`, which
    keeps one strong blob from outweighing the rest of an image; being homogeneous, contrast still cancels."""
    compressed = np.sign(views) * np.abs(views) ** DETAIL_POWER
    return patterns(compressed, MIN_DETAIL_STD**DETAIL_POWER)
