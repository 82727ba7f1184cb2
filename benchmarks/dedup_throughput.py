"""De-duplication speed: hashing throughput, query time, and how the cost grows with the pretraining set.

References are the embedded default's three downstream test sets (1,997 images); queries are the first `n`
and `10 n` images of the embedded pretraining set (built once into data/01_raw/embedded, as by the pipeline).
For each size: hashing alone (decode + canonical square + query descriptors), then the whole search (both
stages, in `--num-proc` processes). Near-linear cost means the 10x set takes at most 12x the time.

    python benchmarks/dedup_throughput.py                  # n = 2,400 and 24,000, 2 processes
    python benchmarks/dedup_throughput.py --n 1000 --num-proc 1

Prints a table and writes `benchmarks/results/dedup_throughput.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import datasets
import numpy as np
from threadpoolctl import threadpool_limits

from vit_pipelines.data import embedded
from vit_pipelines.data.sources import load_image_dataset
from vit_pipelines.dedup import DedupConfig, build_index, join_references, search
from vit_pipelines.dedup.fingerprint import canonical
from vit_pipelines.dedup.index import Queries

RESULTS = Path(__file__).parent / "results" / "dedup_throughput.json"


def hashing_seconds(pretrain: datasets.Dataset, batch_size: int) -> float:
    """One process: decode every image, make its canonical square and its query descriptors."""
    images = pretrain.cast_column("image", datasets.Image(decode=False))
    start = time.perf_counter()
    with threadpool_limits(1):
        for batch in images.iter(batch_size=batch_size):
            Queries.from_canonical(np.stack([canonical(value) for value in batch["image"]]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", type=int, default=2_400, help="the smaller query set (the larger is 10x), <= 2,400"
    )
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()

    full = load_image_dataset("embedded:pretrain")  # the pipeline's default set, built once
    if 10 * args.n > len(full):
        parser.error(f"--n {args.n}: 10x that exceeds the {len(full)} embedded pretraining images")
    tests = {n: load_image_dataset(f"embedded:{n}", split="test") for n in embedded.DOWNSTREAM_NAMES}
    start = time.perf_counter()
    index, _ = build_index(join_references(tests)[0])
    index_seconds = time.perf_counter() - start
    config = DedupConfig(batch_size=args.batch_size, num_proc=args.num_proc)

    rows = []
    for n in (args.n, 10 * args.n):
        queries = full.select(range(n))
        hashing = hashing_seconds(queries, args.batch_size)
        result = search(queries, index, config, progress=False)
        rows.append({"queries": n, "hashing_seconds": hashing, "hashing_images_per_second": n / hashing,
                     "search_seconds": result.seconds, "search_images_per_second": n / result.seconds,
                     "matches": len(result.matches)})  # fmt: skip
    growth = rows[1]["search_seconds"] / rows[0]["search_seconds"]

    print(f"references: {len(index)} test images, index built in {index_seconds:.2f} s")
    print(
        f"{'queries':>8} {'hashing img/s (1 proc)':>23} {'search s':>9} {'search img/s':>13} {'matches':>8}"
    )
    for r in rows:
        print(f"{r['queries']:>8} {r['hashing_images_per_second']:>23.0f} {r['search_seconds']:>9.2f} "
              f"{r['search_images_per_second']:>13.0f} {r['matches']:>8}")  # fmt: skip
    print(
        f"10x the queries took {growth:.2f}x the time (near-linear: <= 12x) with {args.num_proc} process(es)"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "num_proc": args.num_proc, "batch_size": args.batch_size, "references": len(index),
        "index_seconds": index_seconds, "rows": rows, "growth_10x": growth,
    }, indent=2))  # fmt: skip
    if growth > 12:
        raise SystemExit(f"cost grew {growth:.1f}x for 10x the queries: not near-linear")


if __name__ == "__main__":
    main()
