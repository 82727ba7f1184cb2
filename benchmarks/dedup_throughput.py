"""De-duplication speed: hashing throughput, query time, and how the cost grows with the pretraining set.

References are the embedded default's three downstream test sets (1,997 images); queries are the first `n`
and `10 n` images of the embedded pretraining set (built once into data/01_raw/embedded, as by the pipeline).
For each size: hashing alone (decode + canonical square + query descriptors), then the whole search (both
stages, in `--num-proc` processes). Near-linear cost means the 10x set takes at most 12x the time. The 10x
set is searched again without the copy model (stage 3): with it, a query costs at most 1.5x.

    python benchmarks/dedup_throughput.py                  # n = 2,400 and 24,000, 2 processes
    python benchmarks/dedup_throughput.py --n 1000 --num-proc 1

Prints a table and writes `benchmarks/results/dedup_throughput.json` (`benchmarks/run.py` runs everything).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

import datasets
import numpy as np
from report import machine, print_table, write_json
from threadpoolctl import threadpool_limits

from vit_pipelines.data import embedded
from vit_pipelines.data.sources import load_image_dataset
from vit_pipelines.dedup import DedupConfig, build_index, join_references, search
from vit_pipelines.dedup.fingerprint import canonical
from vit_pipelines.dedup.index import Queries


def hashing_seconds(pretrain: datasets.Dataset, batch_size: int) -> float:
    """One process: decode every image, make its canonical square and its query descriptors."""
    images = pretrain.cast_column("image", datasets.Image(decode=False))
    start = time.perf_counter()
    with threadpool_limits(1):
        for batch in images.iter(batch_size=batch_size):
            Queries.from_canonical(np.stack([canonical(value) for value in batch["image"]]))
    return time.perf_counter() - start


def run(n: int = 2_400, num_proc: int = 2, batch_size: int = 512) -> dict[str, Any]:
    full = load_image_dataset("embedded:pretrain")  # the pipeline's default set, built once
    if 10 * n > len(full):
        raise ValueError(f"n = {n}: 10x that exceeds the {len(full)} embedded pretraining images")
    tests = {name: load_image_dataset(f"embedded:{name}", split="test") for name in embedded.DOWNSTREAM_NAMES}
    start = time.perf_counter()
    index, _ = build_index(join_references(tests)[0])
    index_seconds = time.perf_counter() - start
    config = DedupConfig(batch_size=batch_size, num_proc=num_proc)
    rows = []
    for size in (n, 10 * n):
        queries = full.select(range(size))
        hashing = hashing_seconds(queries, batch_size)
        result = search(queries, index, config, progress=False)
        rows.append({"queries": size, "hashing_seconds": hashing, "hashing_images_per_second": size / hashing,
                     "search_seconds": result.seconds, "search_images_per_second": size / result.seconds,
                     "matches": len(result.matches)})  # fmt: skip
    without = search(queries, index, replace(config, copy_model=False), progress=False)
    return {
        "benchmark": "dedup_throughput", "machine": machine(), "num_proc": num_proc, "batch_size": batch_size,
        "references": len(index), "index_seconds": index_seconds, "rows": rows,
        "growth_10x": rows[1]["search_seconds"] / rows[0]["search_seconds"],
        "without_copy_model": {"search_seconds": without.seconds, "matches": len(without.matches)},
        "copy_model_cost": rows[1]["search_seconds"] / without.seconds,
    }  # fmt: skip


def report(result: dict[str, Any]) -> list[list[Any]]:
    rows = [
        [
            f"{r['queries']:,} queries",
            r["hashing_images_per_second"],
            r["search_seconds"],
            r["search_images_per_second"],
            r["matches"],
        ]  # fmt: skip
        for r in result["rows"]
    ]
    print_table(
        f"de-duplication against {result['references']:,} test images (index built in "
        f"{result['index_seconds']:.2f} s; search in {result['num_proc']} processes)",
        ["", "hashing img/s (1 proc)", "search s", "search img/s", "matches"],
        rows,
    )
    print(f"10x the queries took {result['growth_10x']:.2f}x the time (near-linear: <= 12x)")
    without = result["without_copy_model"]
    print(
        f"without the copy model: {without['search_seconds']:.1f} s, {without['matches']} matches; with it a "
        f"query costs {result['copy_model_cost']:.2f}x (goal: <= 1.5x)"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", type=int, default=2_400, help="the smaller query set (the larger is 10x), <= 2,400"
    )
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/dedup_throughput.json")
    args = parser.parse_args()
    result = run(args.n, args.num_proc, args.batch_size)
    report(result)
    write_json(args.out, result)
    if result["growth_10x"] > 12:
        raise SystemExit(f"cost grew {result['growth_10x']:.1f}x for 10x the queries: not near-linear")
    if result["copy_model_cost"] > 1.5:
        raise SystemExit(f"the copy model made a query cost {result['copy_model_cost']:.2f}x: over 1.5x")


if __name__ == "__main__":
    main()
