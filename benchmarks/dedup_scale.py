"""De-dup at scale: stage-1 cost and memory with 10x and 100x the test images, and the 14M x 300k arithmetic.

References: the embedded default's 1,997 test images, then as many more generated ones (smooth random
luminance and chroma fields, described by the project's code) as make 10x and 100x. Queries: the first
`--queries` embedded pretraining images. For each size: stage 1 alone, exact (every descriptor; on at most
256 queries) and the faiss inverted-file index (`stage1: ivf`), in milliseconds per query on one core, with
build time, index bytes per reference, the IVF's agreement with the exact candidates and the share of the
embedded set's 60 planted copies whose test image stage 1 retrieves; then the whole search (`stage1: auto`,
both stages, one process) and its peak memory (numpy arrays traced, plus faiss's codes). The extrapolation
adds the decode of an ImageNet-sized JPEG.

    python benchmarks/dedup_scale.py                  # 1x, 10x, 100x references (~10 min on 2 cores)
    python benchmarks/dedup_scale.py --scales 1 10    # quicker

Prints a table and writes `benchmarks/results/dedup_scale.json`.
"""

from __future__ import annotations

import argparse
import io
import math
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import skimage.data
from report import machine, print_table, write_json
from threadpoolctl import threadpool_limits

from vit_pipelines.data import embedded
from vit_pipelines.data.sources import load_image_dataset
from vit_pipelines.dedup import DedupConfig, build_index, join_references, search
from vit_pipelines.dedup.fingerprint import CANONICAL, axis_matrix, canonical
from vit_pipelines.dedup.index import (
    CandidateSearch,
    Queries,
    ReferenceIndex,
    reference_descriptors,
    to_uint8,
)
from vit_pipelines.dedup.search import _canonical_batch, _ImageSource

TARGET = {"queries": 14_000_000, "references": 300_000, "cores": 64, "hours": 4.0}
EXACT_QUERIES = 256  # exact stage 1 at 100x costs ~0.2 s a query: a sample is enough


def generated_references(count: int, seed: int = 0, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """`count` canonical squares of smooth random fields (uint8) and their stage-1 descriptors."""
    rng = np.random.default_rng(seed)
    planes, descriptors = [], []
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        fields = sum(
            axis_matrix(cells, CANONICAL, 0.5, 1.0)
            @ rng.normal(0.0, weight, (n, 3, cells, cells))
            @ axis_matrix(cells, CANONICAL, 0.5, 1.0).T
            for cells, weight in ((6, 1.0), (16, 0.4))
        )  # smooth fields with some detail: not blank, not alike
        fields[:, 0] = 128 + 50 * fields[:, 0]
        fields[:, 1:] *= 25
        squares = np.clip(np.rint(fields), [[[0]], [[-128]], [[-128]]], [[[255]], [[127]], [[127]]])
        squares = squares.astype(np.float32)
        planes.append(to_uint8(squares))
        descriptors.append(reference_descriptors(squares))
    return np.concatenate(planes), np.concatenate(descriptors)


def per_query_ms(stage1: CandidateSearch, queries: Queries, limit: int) -> tuple[float, set]:
    descriptors = queries.descriptors[:limit]
    with threadpool_limits(1):
        start = time.perf_counter()
        hits = stage1.best(descriptors, DedupConfig.candidate_threshold, DedupConfig.max_candidates)
        seconds = time.perf_counter() - start
    return 1e3 * seconds / len(descriptors), {(h[0], h[2]) for h in hits}


def jpeg_decode_ms(repeats: int = 50) -> float:
    """`canonical` of a 500x375 JPEG (ImageNet's typical size and quality), one core."""
    image = PIL.Image.fromarray(skimage.data.chelsea()).resize((500, 375))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    start = time.perf_counter()
    for _ in range(repeats):
        canonical(data)
    return 1e3 * (time.perf_counter() - start) / repeats


def leaked_queries() -> tuple[Queries, np.ndarray]:
    """The embedded pretraining set's planted copies of test images, and the test image (its position in
    the joined test sets) each copies."""
    pretrain = load_image_dataset("embedded:pretrain")
    leaks = embedded.leaked_copies(len(pretrain))
    sizes = {
        name: len(load_image_dataset(f"embedded:{name}", split="test")) for name in embedded.DOWNSTREAM_NAMES
    }
    offsets = dict(zip(sizes, np.cumsum([0, *sizes.values()]), strict=False))
    rows = [leak["pretrain_index"] for leak in leaks]
    arrays, kept, _ = _canonical_batch(_ImageSource(pretrain.select(rows), "leaks").batch(0, len(rows)))
    truth = np.array([offsets[leaks[k]["downstream"]] + leaks[k]["test_index"] for k in kept])
    return Queries.from_canonical(arrays), truth


def leak_recall(stage1: CandidateSearch, leaks: Queries, truth: np.ndarray) -> float:
    """Stage 1 alone: the fraction of planted copies whose test image is among their candidates."""
    _, hits = per_query_ms(stage1, leaks, len(truth))
    return float(np.mean([(q, int(r)) in hits for q, r in enumerate(truth)]))


def traced_build(
    planes: np.ndarray, descriptors: np.ndarray, batch: Any
) -> tuple[ReferenceIndex, float, float]:
    """The index (`stage1: auto`) over copies of the references' planes and descriptors, its build seconds,
    and the peak bytes of building it and searching one batch: numpy's arrays as tracemalloc sees them (the
    copies included), plus faiss's codes."""
    tracemalloc.start()
    start = time.perf_counter()
    index = ReferenceIndex(planes.copy(), descriptors=descriptors.copy(), stage1="auto")
    seconds = time.perf_counter() - start
    search(batch, index, DedupConfig(), progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    codes = index.stage1.bytes_per_reference * len(index) if index.stage1.kind == "ivf" else 0
    return index, seconds, peak + codes


def run(scales: Sequence[int] = (1, 10, 100), num_queries: int = 2_400) -> dict[str, Any]:
    tests = {name: load_image_dataset(f"embedded:{name}", split="test") for name in embedded.DOWNSTREAM_NAMES}
    base, _ = build_index(join_references(tests)[0], DedupConfig(num_proc=2, stage1="exact"))
    pretrain = load_image_dataset("embedded:pretrain").select(range(num_queries))
    arrays, _, _ = _canonical_batch(_ImageSource(pretrain, "queries").batch(0, num_queries))
    queries = Queries.from_canonical(arrays)
    leaks, truth = leaked_queries()
    extra_planes, extra_descriptors = generated_references(len(base) * (max(scales) - 1))
    base_descriptors = reference_descriptors(base.planes)
    rows = []
    for scale in sorted(scales):
        count = len(base) * scale
        planes = np.concatenate([base.planes, extra_planes[: count - len(base)]])
        descriptors = np.concatenate([base_descriptors, extra_descriptors[: count - len(base)]])
        index, build_seconds, peak = traced_build(planes, descriptors, pretrain.select(range(512)))
        result = search(pretrain, index, DedupConfig(), progress=False)
        exact = CandidateSearch(descriptors, "exact")
        exact_ms, exact_hits = per_query_ms(exact, queries, EXACT_QUERIES)
        if index.stage1.kind == "exact":
            start = time.perf_counter()
            ivf = CandidateSearch(descriptors, "ivf")
            build_seconds = time.perf_counter() - start
        else:
            ivf = index.stage1
        ivf_ms, _ = per_query_ms(ivf, queries, num_queries)
        _, ivf_hits = per_query_ms(ivf, queries, EXACT_QUERIES)
        rows.append({
            "references": count, "exact_ms_per_query": exact_ms, "ivf_ms_per_query": ivf_ms,
            "ivf_build_seconds": build_seconds, "ivf_lists": ivf.ivf.nlist,
            "ivf_agreement": len(exact_hits & ivf_hits) / max(len(exact_hits), 1),
            "leak_recall": {"exact": leak_recall(exact, leaks, truth), "ivf": leak_recall(ivf, leaks, truth)},
            "stage1_bytes_per_reference": {"exact": exact.bytes_per_reference, "ivf": ivf.bytes_per_reference},
            "stage2_bytes_per_reference": planes[0].nbytes, "auto": index.stage1.kind,
            "search_ms_per_query": 1e3 * result.seconds / num_queries, "matches": len(result.matches),
            "peak_mb": peak / 2**20, "peak_bytes_per_reference": peak / count,
        })  # fmt: skip
    jpeg_ms = jpeg_decode_ms()
    return {
        "benchmark": "dedup_scale", "machine": machine(), "queries": num_queries, "leaks": len(truth),
        "rows": rows, "extrapolation": extrapolate(rows, jpeg_ms),
    }  # fmt: skip


def extrapolate(rows: list[dict[str, Any]], jpeg_ms: float) -> dict[str, Any]:
    """Seconds per query at 300k references: the largest measured search, its stage 1 grown along the
    measured 10x → 100x exponent, plus the decode of a real JPEG in place of the embedded image's."""
    small, large = rows[-2], rows[-1]
    growth = math.log(large["ivf_ms_per_query"] / small["ivf_ms_per_query"]) / math.log(
        large["references"] / small["references"]
    )
    stage1 = large["ivf_ms_per_query"] * (TARGET["references"] / large["references"]) ** growth
    embedded_decode = large["search_ms_per_query"] - large["ivf_ms_per_query"]  # decode + describe + stage 2
    per_query = large["search_ms_per_query"] + (stage1 - large["ivf_ms_per_query"]) + jpeg_ms
    core_hours = TARGET["queries"] * per_query / 1e3 / 3600
    return {
        "stage1_growth_exponent": growth, "stage1_ms_at_target": stage1,
        "other_ms_per_query": embedded_decode, "jpeg_decode_ms": jpeg_ms, "ms_per_query": per_query,
        "core_hours": core_hours, "hours_on_64_cores": core_hours / TARGET["cores"],
        "build_seconds_at_target": large["ivf_build_seconds"] * TARGET["references"] / large["references"],
    }  # fmt: skip


def report(result: dict[str, Any]) -> list[list[Any]]:
    rows = [
        [f"{r['references']:,}", r["exact_ms_per_query"], r["ivf_ms_per_query"], r["ivf_agreement"],
         f"{r['leak_recall']['exact']:.3f} / {r['leak_recall']['ivf']:.3f}", r["ivf_build_seconds"],
         r["stage1_bytes_per_reference"]["ivf"], r["auto"], r["search_ms_per_query"], r["peak_mb"],
         r["peak_bytes_per_reference"]]
        for r in result["rows"]
    ]  # fmt: skip
    print_table(
        f"de-dup stage 1 against growing test sets ({result['queries']:,} embedded pretraining queries, one core)",
        ["references", "exact ms/q", "ivf ms/q", "ivf = exact", f"{result['leaks']} leaks: exact / ivf",
         "ivf build s", "ivf B/ref", "auto", "search ms/q", "peak MB", "peak B/ref"],
        rows,
    )  # fmt: skip
    x = result["extrapolation"]
    first, last = result["rows"][0], result["rows"][-1]
    print(
        f"\nivf cost from {first['references']:,} to {last['references']:,} references: "
        f"x{last['ivf_ms_per_query'] / first['ivf_ms_per_query']:.2f} (exact: "
        f"x{last['exact_ms_per_query'] / first['exact_ms_per_query']:.1f})\n"
        f"{TARGET['queries']:,} x {TARGET['references']:,} on {TARGET['cores']} cores: per query "
        f"{x['stage1_ms_at_target']:.2f} ms stage 1 (growth exponent {x['stage1_growth_exponent']:.2f}) + "
        f"{x['other_ms_per_query']:.2f} ms stage 2 and description + {x['jpeg_decode_ms']:.2f} ms JPEG decode = "
        f"{x['ms_per_query']:.2f} ms;\n  {TARGET['queries']:,} x {x['ms_per_query']:.2f} ms = "
        f"{x['core_hours']:.1f} core-hours = {x['hours_on_64_cores']:.2f} h on {TARGET['cores']} cores "
        f"(goal <= {TARGET['hours']} h), plus an index build of ~{x['build_seconds_at_target']:.0f} s"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--queries", type=int, default=2_400)
    parser.add_argument("--out", default="benchmarks/results/dedup_scale.json")
    args = parser.parse_args()
    if len(args.scales) < 2:
        parser.error("--scales needs at least two sizes to measure growth")
    result = run(args.scales, args.queries)
    report(result)
    write_json(args.out, result)
    if result["extrapolation"]["hours_on_64_cores"] > TARGET["hours"]:
        raise SystemExit("the extrapolated 14M x 300k de-dup exceeds its goal")


if __name__ == "__main__":
    main()
