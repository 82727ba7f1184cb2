"""Every benchmark of the project in one command: one table per benchmark and `benchmarks/results.json`.

    pip install -c constraints-cpu.txt -e ".[bench]"
    python benchmarks/run.py                       # all (about 40 minutes on 2 CPU cores)
    python benchmarks/run.py --only training data  # a subset (of training breakdown data scale fewshot
                                                   # dedup dedup_scale ranks memory): updates those entries of
                                                   # results.json, keeps the others
    python benchmarks/run.py --memory-steps 200    # the pretrain memory run shortened to 200 steps

1. training: this project's ViT vs transformers' ViT (Ti/4 @32, S/16 @224; fp32/bf16 x eager/compiled),
   FLOPs, TFLOP/s and MFU against the bf16 matmul peak measured in the same run, loss-curve parity;
2. breakdown: where our Ti/4@32 bf16 training step goes, per kernel and matmul (time, GB/s, TFLOP/s), beside the
   machine's copy bandwidth;
3. data: the cache's train loader vs the default pretrain model's training step; scale: 2,000 real-size JPEGs
   through the encoded cache (storage, build speed-up, decode cost against plain PIL, data wait);
4. fewshot: the few-shot ridge grid vs scikit-learn's Ridge per λ;
5. dedup: de-duplication hashing and search throughput, and its growth with 10x the images; dedup_scale: its
   stage 1 with 10x and 100x the test images, and the arithmetic for 14M x 300k on 64 cores;
6. ranks: de-dup, few-shot features and evaluation on 1 and 2 gloo ranks: shares, wall time, same outputs;
7. memory: peak RSS of the default `kedro run --pipelines pretrain`.

Each is also a script of its own (`benchmarks/<name>.py`) with more options. Shared machines are noisy: every
comparison is made inside one run, never against numbers from another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmark modules

import data_loading  # noqa: E402
import data_scale  # noqa: E402
import dedup_scale  # noqa: E402
import dedup_throughput  # noqa: E402
import fewshot_grid  # noqa: E402
import pretrain_memory  # noqa: E402
import rank_shares  # noqa: E402
import step_breakdown  # noqa: E402
import train_throughput  # noqa: E402
from report import machine, write_json  # noqa: E402

BENCHMARKS = {
    "training": train_throughput,
    "breakdown": step_breakdown,
    "data": data_loading,
    "scale": data_scale,
    "fewshot": fewshot_grid,
    "dedup": dedup_throughput,
    "dedup_scale": dedup_scale,
    "ranks": rank_shares,
    "memory": pretrain_memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--memory-steps", type=int, default=None, help="shorten the pretrain memory run")
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

    command = " ".join(["python", *sys.argv])
    results = {"machine": machine(), "command": command, "benchmarks": {}}
    if set(args.only) != set(BENCHMARKS) and os.path.exists(args.out):
        # a subset replaces its own entries (each records its command) and keeps the file's other entries and
        # its header, which describes the last full run
        with open(args.out) as f:
            results = json.load(f)
    for name in args.only:
        start = time.perf_counter()
        module = BENCHMARKS[name]
        result = module.run(args.memory_steps) if name == "memory" else module.run()
        result["benchmark_seconds"] = time.perf_counter() - start
        result["command"] = command
        module.report(result)
        results["benchmarks"][name] = result
        write_json(args.out, results)  # after each: a late failure keeps the earlier results


if __name__ == "__main__":
    main()
