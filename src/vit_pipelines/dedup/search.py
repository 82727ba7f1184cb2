"""`find_near_duplicates` and the streaming search under it: many queries, in batches, against a small index.

Cost is linear in the number of queries: each batch is decoded, described and compared with the index in
bounded chunks, then dropped; only the matches are kept. With `num_proc` > 1, worker processes take batches
in turn (they inherit the index and a memory-mapped dataset when the platform can fork).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import datasets
import numpy as np
import PIL.Image
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from vit_pipelines.data.cache import resolve_num_proc
from vit_pipelines.data.ops import BadImageError
from vit_pipelines.data.streaming import StreamedImages
from vit_pipelines.dedup.copymodel import CopyEvidence, certain
from vit_pipelines.dedup.fingerprint import CANONICAL, canonical
from vit_pipelines.dedup.index import STAGE1_BOXES, Queries, ReferenceIndex, reference_descriptors, to_uint8
from vit_pipelines.training.loop import rank_share
from vit_pipelines.workers import die_with_parent

log = logging.getLogger(__name__)
T = TypeVar("T")

SKIPPED_EXAMPLES = 5  # unreadable queries named per reason
DEFAULT_THRESHOLD = 0.9
"""Band-passed luminance correlation from which a query is a copy (docs/dedup.md has the measurements)."""


@dataclass(frozen=True)
class DedupConfig:
    """Knobs of the three-stage search; the defaults are those of `conf/base/parameters_dedup.yml`."""

    threshold: float = DEFAULT_THRESHOLD  # stage 2: a copy scores at least this (correlation, -1..1)
    colour_threshold: float = 0.93  # stage 2: colour agreement a coloured query must reach (cosine)
    candidate_threshold: float = 0.75  # stage 1: DCT-descriptor cosine to become a candidate
    max_candidates: int = 3  # stage 1: candidates verified per query, best first
    batch_size: int = 512  # queries decoded and compared at a time
    num_proc: int = 1  # worker processes; 1 searches in this process
    stage1: str = "auto"  # stage 1: exact, ivf (faiss inverted file), auto: ivf from `IVF_FROM` references
    nprobe: int = 32  # stage 1, ivf: lists scanned per query
    copy_model: bool = True  # stage 3: a match must also pass the copy model's checks (`copymodel.py`)

    def __post_init__(self) -> None:
        for name in ("threshold", "colour_threshold", "candidate_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"dedup.{name} is a cosine or correlation in [-1, 1], got {getattr(self, name)}"
                )
        for name in ("max_candidates", "batch_size", "num_proc", "nprobe"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"dedup.{name} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.copy_model, bool):
            raise ValueError(f"dedup.copy_model must be true or false, got {self.copy_model!r}")
        if self.stage1 not in ("auto", "exact", "ivf"):
            raise ValueError(f"dedup.stage1 must be auto, exact or ivf, got {self.stage1!r}")

    @classmethod
    def from_params(cls, params: dict[str, Any], processes: int = 1) -> DedupConfig:
        """The known keys of `params` (others, such as the pipeline's, are ignored); `num_proc: auto` shares
        the cores among `processes` ranks."""
        values = {k: v for k, v in params.items() if k in cls.__dataclass_fields__ and v is not None}
        if values.get("num_proc") == "auto":
            values["num_proc"] = resolve_num_proc("auto", processes)
        return cls(**values)


@dataclass(frozen=True)
class Match:
    query: int
    reference: int
    score: float  # stage-2 correlation, -1..1
    colour: float  # stage-2 colour agreement (1 for a grey query)
    mirrored: bool  # the query matches the reference flipped left-right
    evidence: CopyEvidence | None = None  # stage 3 (None when `copy_model` is off)

    @property
    def certain(self) -> bool:
        """Certain, else borderline (`copymodel.certain`)."""
        return certain(self.score, self.evidence)


@dataclass
class SearchResult:
    matches: list[Match]  # at most one per query (its best reference), by query index
    queries: int
    skipped: dict[str, int] = field(default_factory=dict)  # unreadable queries by reason
    skipped_examples: dict[str, list[int]] = field(default_factory=dict)  # the first few of each reason
    seconds: float = 0.0


def find_near_duplicates(
    queries: Sequence[Any] | datasets.Dataset | StreamedImages,
    references: Sequence[Any] | datasets.Dataset,
    threshold: float | None = None,
    *,
    config: DedupConfig | None = None,
    progress: bool = False,
) -> list[tuple[int, int, float]]:
    """`(query_index, reference_index, score)` for every query that is a near-duplicate of some reference
    (its best match), sorted by query index.

    `queries` and `references` are sequences of PIL images (encoded bytes, HF `{"bytes", "path"}` dicts and
    paths work too) or HF Datasets with an `image` column. Robust to JPEG re-encoding, resizing (any aspect),
    crops of up to 10% of a side, borders, horizontal flips, brightness/contrast/saturation changes and
    grayscale. `threshold` (default `DEFAULT_THRESHOLD`) overrides `config.threshold`. Unreadable images are
    skipped (queries: logged); raises ValueError when no reference is readable, TypeError for other inputs.
    """
    config = config or DedupConfig()
    if threshold is not None:
        config = replace(config, threshold=threshold)
    index, _ = build_index(references, config)
    result = search(queries, index, config, progress=progress)
    if result.skipped:
        log.warning("skipped %d unreadable queries: %s", sum(result.skipped.values()), result.skipped)
    return [(m.query, m.reference, m.score) for m in result.matches]


def build_index(
    references: Sequence[Any] | datasets.Dataset, config: DedupConfig | None = None
) -> tuple[ReferenceIndex, dict[str, int]]:
    """The index over all readable references, and the unreadable ones counted by reason. Reference indices
    in matches count every reference, readable or not. References are decoded and described
    `config.batch_size` at a time on `config.num_proc` processes."""
    config = config or DedupConfig()
    images = _ImageSource(references, "references")
    if len(images) == 0:
        raise ValueError("references is empty: there is nothing to de-duplicate against")
    spans = [(s, min(s + config.batch_size, len(images))) for s in range(0, len(images), config.batch_size)]
    planes, descriptors, kept, skipped = [], [], [], Counter()
    for span, (span_planes, span_descriptors, span_kept, span_unreadable) in zip(
        spans, _parallel(_describe_references, spans, config.num_proc, source=images), strict=True
    ):
        planes.append(span_planes)
        descriptors.append(span_descriptors)
        kept += [span[0] + k for k in span_kept]
        skipped.update(reason for _, reason in span_unreadable)
    if not kept:
        raise ValueError(f"none of the {len(images)} references could be read: {dict(skipped)}")
    if skipped:
        log.warning("skipped %d unreadable references: %s", sum(skipped.values()), dict(skipped))
    index = ReferenceIndex(
        np.concatenate(planes), np.array(kept), np.concatenate(descriptors), config.stage1, config.nprobe
    )
    return index, dict(skipped)


def join_references(
    sets: Mapping[str, Sequence[Any] | datasets.Dataset],
) -> tuple[list[Any], list[tuple[str, int]]]:
    """The images of several named reference sets as one list (for one index), and for each image its
    (set name, index within the set)."""
    images, owners = [], []
    for name, data in sets.items():
        source = _ImageSource(data, name)
        images += source.batch(0, len(source))
        owners += [(name, i) for i in range(len(source))]
    return images, owners


def search(
    queries: Sequence[Any] | datasets.Dataset | StreamedImages,
    index: ReferenceIndex,
    config: DedupConfig,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
) -> SearchResult:
    """Stream `queries` through every stage, `config.batch_size` at a time on `config.num_proc` processes.
    With `world` > 1 only this rank's share of the queries (see `_units`); the shares' matches together are
    the matches of one process."""
    source = _ImageSource(queries, "queries")
    start = time.perf_counter()
    units = _units(source, config.batch_size, rank, world)
    total = sum(stop - first for unit in units for first, stop in unit)
    matches: list[Match] = []
    unreadable: list[tuple[int, str]] = []
    with tqdm(total=total, unit="img", desc="de-duplicating", disable=not progress) as bar:
        work = _parallel(_search_unit, units, config.num_proc, source=source, index=index, config=config)
        for batch_matches, batch_unreadable, size in work:
            matches += batch_matches
            unreadable += batch_unreadable
            bar.update(size)
    matches.sort(key=lambda m: m.query)
    skipped = Counter(reason for _, reason in unreadable)
    examples = {r: [q for q, reason in unreadable if reason == r][:SKIPPED_EXAMPLES] for r in sorted(skipped)}
    return SearchResult(matches, total, dict(skipped), examples, time.perf_counter() - start)


# --------------------------------------------------------------------------------------- batches and workers
class _ImageSource:
    """Uniform slicing over a sequence of images or a Dataset's `image` column (left undecoded)."""

    def __init__(self, data: Sequence[Any] | datasets.Dataset | StreamedImages, what: str) -> None:
        if isinstance(data, datasets.Dataset):
            if "image" not in data.column_names:
                raise ValueError(f"{what} has no 'image' column; its columns are {data.column_names}")
            data = data.select_columns(["image"])
            if isinstance(
                data.features["image"], datasets.Image
            ):  # undecoded: a bad file must not raise here
                data = data.cast_column("image", datasets.Image(decode=False))
        elif isinstance(data, str | bytes | PIL.Image.Image) or not isinstance(
            data, Sequence | StreamedImages
        ):
            raise TypeError(
                f"{what} must be a sequence of images or a datasets.Dataset, got {type(data).__name__}"
            )
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, start: int, stop: int) -> list[Any]:
        if isinstance(self.data, datasets.Dataset | StreamedImages):
            return self.data[start:stop]["image"]
        return list(self.data[start:stop])


def _units(
    source: _ImageSource, batch_size: int, rank: int = 0, world: int = 1
) -> list[list[tuple[int, int]]]:
    """Rank `rank`'s batches of queries as units of work. In memory: the rank's contiguous `1/world` of the
    rows, one batch per unit. Streamed: the parts `rank, rank + world, …`, one part's batches per unit (a worker
    reads the part once, front to back)."""
    if isinstance(source.data, StreamedImages):
        bounds = source.data.part_offsets
        shares = [(bounds[i], bounds[i + 1]) for i in range(rank, len(bounds) - 1, world)]
    else:
        rows = rank_share(len(source), rank, world)
        shares = [(rows.start, rows.stop)]
    units = []
    for first, end in shares:
        spans = [(int(s), int(min(s + batch_size, end))) for s in range(first, end, batch_size)]
        units += [spans] if isinstance(source.data, StreamedImages) else [[span] for span in spans]
    return units


def _canonical_batch(values: list[Any]) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """What can be decoded: canonical arrays [K, 3, C, C], their positions in `values`; the (position, reason)
    of the others."""
    arrays, kept, unreadable = [], [], []
    for i, value in enumerate(values):
        try:
            arrays.append(canonical(value))
            kept.append(i)
        except BadImageError as err:
            unreadable.append((i, err.reason))
    return (np.stack(arrays) if arrays else np.empty((0, 3, 1, 1), np.float32)), kept, unreadable


def _describe_references(
    span: tuple[int, int], source: _ImageSource
) -> tuple[np.ndarray, np.ndarray, list[int], list[tuple[int, str]]]:
    """references[span] → uint8 canonical squares, stage-1 descriptors, their positions in the span, and
    the (position, reason) of the unreadable ones."""
    arrays, kept, unreadable = _canonical_batch(source.batch(*span))
    if not kept:
        empty = (
            np.empty((0, 3, CANONICAL, CANONICAL), np.uint8),
            np.empty((0, len(STAGE1_BOXES), 63), np.float16),
        )
        return *empty, [], unreadable
    return to_uint8(arrays), reference_descriptors(arrays), kept, unreadable


Unit = tuple[list[Match], list[tuple[int, str]], int]  # matches, (query, reason) of the unreadable, queries


def _search_span(
    source: _ImageSource, index: ReferenceIndex, config: DedupConfig, span: tuple[int, int]
) -> Unit:
    """Every stage for queries[span]: the best verified match per query, the unreadable, span length."""
    arrays, kept, unreadable = _canonical_batch(source.batch(*span))
    unreadable = [(span[0] + i, reason) for i, reason in unreadable]
    if not kept:
        return [], unreadable, span[1] - span[0]
    queries = Queries.from_canonical(arrays)
    best: dict[int, Match] = {}
    for candidate in index.candidates(queries, config.candidate_threshold, config.max_candidates):
        verdict = index.verify(queries, candidate, config.colour_threshold)
        query = span[0] + kept[candidate.query]
        if verdict.score < config.threshold or verdict.score <= best.get(query, _NO_MATCH).score:
            continue
        evidence = index.evidence(queries, candidate, verdict.frame) if config.copy_model else None
        if evidence is None or not evidence.failures():
            reference = int(index.ids[candidate.reference])
            best[query] = Match(query, reference, verdict.score, verdict.colour, candidate.flip, evidence)
    return list(best.values()), unreadable, span[1] - span[0]


def _search_unit(
    unit: list[tuple[int, int]], source: _ImageSource, index: ReferenceIndex, config: DedupConfig
) -> Unit:
    matches, unreadable, size = [], [], 0
    for span in unit:
        span_matches, span_unreadable, span_size = _search_span(source, index, config, span)
        matches += span_matches
        unreadable += span_unreadable
        size += span_size
    return matches, unreadable, size


_NO_MATCH = Match(-1, -1, -2.0, 0.0, False)
_WORKER: dict[str, Any] = {}  # what every task of a worker shares, set once by `_start_worker`


def _start_worker(shared: dict[str, Any]) -> None:
    die_with_parent()
    threadpool_limits(1)  # small matrix products run slower with BLAS threads; processes give the parallelism
    _WORKER.update(shared)


def _run_task(task: tuple[Callable[..., Any], Any]) -> Any:
    function, item = task
    return function(item, **_WORKER)


def _parallel(function: Callable[..., T], items: list[Any], num_proc: int, **shared: Any) -> Iterator[T]:
    """`function(item, **shared)` for every item, in order: here, or on `num_proc` worker processes."""
    if num_proc <= 1 or len(items) <= 1:
        with threadpool_limits(1):
            yield from (function(item, **shared) for item in items)
        return
    # fork: workers inherit the index and the memory-mapped dataset instead of pickling them
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(num_proc, multiprocessing.get_context(method), _start_worker, (shared,)) as pool:
        yield from pool.map(_run_task, [(function, item) for item in items])
