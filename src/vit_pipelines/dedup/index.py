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
from typing import Any

import numpy as np

from vit_pipelines.dedup.copymodel import CopyEvidence, copy_evidence
from vit_pipelines.dedup.fingerprint import FLIP_SIGNS, Span, dct_descriptors, detail_views, patterns, view

CENTRAL = 0.84  # side of a query's compared central box; a border of up to 8% of the side falls outside it
SHIFT_RANGE = 0.05  # largest offset searched between a copy's frame centre and its original's (fraction)
SCALE_RANGE = (0.88, 1.1)  # sizes of a copy's frame in its original's searched, per axis
STAGE1_BOXES = np.array(
    [
        (0.5 + dx, 0.5 + dy, CENTRAL * s, CENTRAL * s)
        for s, dx, dy in itertools.product((0.92, 1.0, 1.08), (-0.04, 0.0, 0.04), (-0.04, 0.0, 0.04))
    ],
    dtype=np.float32,
)
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
IVF_FROM = 10_000  # references from which `stage1: auto` searches an inverted-file index


@dataclass(frozen=True)
class Verdict:
    score: float  # stage-2 band-passed luminance correlation (-1..1)
    colour: float  # stage-2 colour agreement
    frame: np.ndarray  # [4] (cx, cy, sx, sy): where the query's frame sits in the reference


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
    """What every stage needs of a batch of canonical queries [B, 3, C, C]."""

    planes: np.ndarray  # [B, 3, C, C] the canonical squares, for the copy model
    descriptors: np.ndarray  # [B, 63] central-box DCT descriptors
    detail: np.ndarray  # [B, 2, DETAIL_GRID²] band-passed central-box patterns, upright and mirrored
    colour: np.ndarray  # [B, 2, 4 * COLOUR_GRID²] central-box `colour_pattern`, upright and mirrored

    @classmethod
    def from_canonical(cls, canonical: np.ndarray) -> Queries:
        luma, chroma = canonical[:, 0], canonical[:, 1:]
        detail = detail_views(luma, [_CENTRAL], [_CENTRAL], DETAIL_GRID, DETAIL_SIGMAS)[:, 0, 0]  # [B, g, g]
        mirrored = chroma[..., ::-1]  # the central box is symmetric: mirroring the image mirrors the box
        return cls(
            planes=canonical,
            descriptors=dct_descriptors(luma, _CENTRAL_BOX[None])[:, 0],
            detail=_detail_patterns(np.stack([detail, detail[..., ::-1]], axis=1)),
            colour=np.stack(
                [colour_pattern(chroma, _CENTRAL_BOX), colour_pattern(mirrored, _CENTRAL_BOX)], 1
            ),
        )


class CandidateSearch:
    """Stage 1's nearest-neighbour search over the references' upright box descriptors [R, 27, 63]; a query
    is compared in both orientations, so mirrored copies need no second set of descriptors.

    `exact`: every descriptor, float16 (3.4 KB per reference), compared in chunks of float32 products.
    `ivf`: a faiss inverted-file index of float16 codes (3.7 KB per reference with ids) over about
    2 sqrt(vectors) lists, `nprobe` of which are scanned per query: the cost grows with the square root.
    """

    def __init__(self, descriptors: np.ndarray, kind: str = "auto", nprobe: int = 32) -> None:
        if kind not in ("auto", "exact", "ivf"):
            raise ValueError(f"stage1 must be auto, exact or ivf, got {kind!r}")
        if kind == "auto":
            kind = "ivf" if len(descriptors) >= IVF_FROM else "exact"
        self.kind, self.references, self.nprobe = kind, len(descriptors), nprobe
        vectors = np.ascontiguousarray(descriptors.reshape(-1, descriptors.shape[-1]), dtype=np.float16)
        self.vectors = vectors if kind == "exact" else None
        self.ivf = _ivf_index(vectors) if kind == "ivf" else None

    @property
    def bytes_per_reference(self) -> float:
        if self.ivf is None:
            return self.vectors.nbytes / self.references
        return self.ivf.ntotal * (self.ivf.code_size + 8) / self.references  # codes and 64-bit ids

    def best(self, queries: np.ndarray, threshold: float, limit: int, chunk: int = 1 << 22) -> list[tuple]:
        """(query, similarity, reference, box, flip) of up to `limit` references per query whose best cosine
        over boxes and orientations reaches `threshold`, best first per query."""
        both = np.concatenate([queries, queries * FLIP_SIGNS]).astype(np.float32)  # [2B, 63]
        if self.ivf is None:
            found = self._exact(both, threshold, chunk)
        else:
            found = self._ivf(both, threshold, limit)
        found.sort(key=lambda f: (f[0], -f[1]))
        return [
            hit
            for _, group in itertools.groupby(found, key=lambda f: f[0])
            for hit in itertools.islice(group, limit)
        ]

    def _exact(self, both: np.ndarray, threshold: float, chunk: int) -> list[tuple]:
        queries, boxes = len(both) // 2, len(STAGE1_BOXES)
        refs_per_chunk = max(1, chunk // (boxes * max(1, len(both))))  # both: 2 orientations per query
        found = []
        for start in range(0, self.references, refs_per_chunk):
            block = self.vectors[start * boxes : (start + refs_per_chunk) * boxes].astype(np.float32)
            sims = (both @ block.T).reshape(2, queries, -1, boxes)  # [flip, B, refs, box]
            sims = sims.transpose(1, 2, 3, 0).reshape(queries, -1, 2 * boxes)  # row = box * 2 + flip
            best_row, best = sims.argmax(axis=2), sims.max(axis=2)
            for q, r in zip(*np.nonzero(best >= threshold), strict=True):
                box, flip = divmod(int(best_row[q, r]), 2)
                found.append((int(q), float(best[q, r]), start + int(r), box, bool(flip)))
        return found

    def _ivf(self, both: np.ndarray, threshold: float, limit: int) -> list[tuple]:
        """Each reference has at most 27 vectors per orientation, so the best `27 * limit` vectors of each
        orientation hold the `limit` best references."""

        queries, boxes = len(both) // 2, len(STAGE1_BOXES)
        self.ivf.nprobe = self.nprobe
        k = min(boxes * limit, self.ivf.ntotal)
        sims, rows = self.ivf.search(_padded(both), k)
        best: dict[tuple[int, int], tuple] = {}
        for i, j in zip(*np.nonzero((sims >= threshold) & (rows >= 0)), strict=True):
            q, flip = i % queries, i >= queries
            reference, box = divmod(int(rows[i, j]), boxes)
            if sims[i, j] > best.get((q, reference), (0, -2.0))[1]:
                best[q, reference] = (int(q), float(sims[i, j]), reference, box, bool(flip))
        return list(best.values())

    def __getstate__(self) -> dict:
        import faiss

        state = dict(self.__dict__)
        if self.ivf is not None:  # spawned workers receive the index serialised
            state["ivf"] = faiss.serialize_index(self.ivf)
        return state

    def __setstate__(self, state: dict) -> None:
        import faiss

        if state["ivf"] is not None:
            state["ivf"] = faiss.deserialize_index(state["ivf"])
        self.__dict__.update(state)


def _padded(vectors: np.ndarray) -> np.ndarray:
    """[N, 63] → float32 [N, 64]: a zero column, which leaves inner products alone, makes faiss's
    float16 codes take its vectorised path."""
    return np.pad(vectors.astype(np.float32), ((0, 0), (0, 64 - vectors.shape[1])))


def _ivf_index(vectors: np.ndarray) -> Any:
    import faiss

    lists = int(min(2 * np.sqrt(len(vectors)), len(vectors) // 40, 1 << 16))  # k-means wants 40 points a list
    index = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatIP(64), 64, lists, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    rng = np.random.default_rng(0)
    sample = vectors[np.sort(rng.choice(len(vectors), min(len(vectors), 64 * lists), replace=False))]
    index.train(_padded(sample))
    for start in range(0, len(vectors), 1 << 18):
        index.add(_padded(vectors[start : start + (1 << 18)]))
    return index


def reference_descriptors(canonical: np.ndarray) -> np.ndarray:
    """[R, 3, C, C] canonical squares → float16 [R, 27, 63] descriptors of the upright `STAGE1_BOXES`; all
    zero for a blank reference, which then matches nothing."""
    luma = canonical[:, 0].astype(np.float32)
    whole = detail_views(luma, [(0.5, 1.0)], [(0.5, 1.0)], DETAIL_GRID, DETAIL_SIGMAS)[:, 0, 0]
    blank = ~_detail_patterns(whole).any(1)
    descriptors = dct_descriptors(luma, STAGE1_BOXES)
    descriptors[blank] = 0.0
    return descriptors.astype(np.float16)


def to_uint8(canonical: np.ndarray) -> np.ndarray:
    """Canonical squares (luminance 0..255, chroma centred on 0, all whole numbers) stored losslessly in
    uint8: a quarter of float32's memory."""
    planes = canonical.copy()
    planes[..., 1:, :, :] += 128.0
    return planes.astype(np.uint8)


def from_uint8(planes: np.ndarray) -> np.ndarray:
    """`to_uint8`'s squares back in float32: luminance 0..255, chroma centred on 0."""
    canonical = planes.astype(np.float32)
    canonical[..., 1:, :, :] -= 128.0
    return canonical


class ReferenceIndex:
    """The references' stage-1 `CandidateSearch` and their canonical squares in uint8 for stage 2 (12 KB
    each): `candidates`, then `verify`."""

    def __init__(
        self,
        canonical: np.ndarray,
        ids: np.ndarray | None = None,
        descriptors: np.ndarray | None = None,
        stage1: str = "auto",
        nprobe: int = 32,
    ) -> None:
        """canonical: [R, 3, C, C] float32 (`fingerprint.canonical`) or its `to_uint8`; ids: [R] what
        matches report for each reference (default: its position); descriptors: `reference_descriptors`
        when already computed; stage1, nprobe: see `CandidateSearch`."""
        if len(canonical) == 0:
            raise ValueError("the reference index needs at least one reference image")
        self.ids = np.arange(len(canonical)) if ids is None else np.asarray(ids)
        self.planes = canonical if canonical.dtype == np.uint8 else to_uint8(canonical)
        if descriptors is None:
            descriptors = reference_descriptors(self.planes)
        self.stage1 = CandidateSearch(descriptors, stage1, nprobe)

    def __len__(self) -> int:
        return len(self.planes)

    def luma(self, reference: int) -> np.ndarray:
        return self.planes[reference, 0].astype(np.float32)

    def chroma(self, reference: int) -> np.ndarray:
        return from_uint8(self.planes[reference])[1:]

    def candidates(
        self, queries: Queries, candidate_threshold: float, max_candidates: int
    ) -> list[Candidate]:
        """Stage 1: up to `max_candidates` references per query, best first."""
        return [
            Candidate(q, r, flip, STAGE1_BOXES[box], sim)
            for q, sim, r, box, flip in self.stage1.best(
                queries.descriptors, candidate_threshold, max_candidates
            )
        ]

    def verify(self, queries: Queries, candidate: Candidate, colour_threshold: float) -> Verdict:
        """Stage 2: the score is 0 for a blank query or when the colours disagree (the luminance search is then
        skipped); else the best correlation found by the search, at the returned frame."""
        pattern = queries.detail[candidate.query, int(candidate.flip)]
        colour = self.colour_agreement(queries.colour[candidate.query, int(candidate.flip)], candidate)
        if not pattern.any() or colour < colour_threshold:
            return Verdict(0.0, colour, candidate.box / np.array([1, 1, CENTRAL, CENTRAL], np.float32))
        luma = self.luma(candidate.reference)
        x = (float(candidate.box[0]), float(candidate.box[2]) / CENTRAL)  # (centre, scale) of each axis
        y = (float(candidate.box[1]), float(candidate.box[3]) / CENTRAL)
        score = -1.0
        for shift_step, scale_step in _SEARCH_STEPS:
            xs, ys = _axis_options(*x, shift_step, scale_step), _axis_options(*y, shift_step, scale_step)
            scores = _grid_correlations(luma, xs, ys, pattern)  # [len(ys), len(xs)]
            iy, ix = np.unravel_index(int(scores.argmax()), scores.shape)
            x, y, score = xs[ix], ys[iy], float(scores[iy, ix])
        return Verdict(score, colour, np.array([x[0], y[0], x[1], y[1]], np.float32))

    def evidence(self, queries: Queries, candidate: Candidate, frame: np.ndarray) -> CopyEvidence:
        """Stage 3: the copy model's checks of the query against the reference seen through `frame`."""
        query = queries.planes[candidate.query]
        if candidate.flip:
            query = query[..., ::-1]
        return copy_evidence(query, from_uint8(self.planes[candidate.reference]), frame, CENTRAL)

    def colour_agreement(self, query: np.ndarray, candidate: Candidate) -> float:
        """Cosine of the query's `colour_pattern` and the reference's in the candidate's box (1: grey query).
        The reference's norm is floored at a third of a coloured query's least (copies scale chroma by at most
        ~3x), so a grey reference scores near 0."""
        whole = query[: query.size // 2]
        floor = MIN_CHROMA * np.sqrt(whole.size)  # an RMS of MIN_CHROMA levels
        if np.linalg.norm(whole) < floor:
            return 1.0
        reference = colour_pattern(self.chroma(candidate.reference), candidate.box)
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
