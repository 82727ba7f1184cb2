"""De-dup, few-shot feature extraction and evaluation on 1 and 2 gloo ranks: each rank's share of the work,
the wall time of each stage, and outputs identical to one process.

The cores are shared among the ranks (de-dup workers and torch threads per rank: cores / ranks), so the
comparison is of the same machine split two ways. On one machine two ranks cannot be faster than one process
that already uses every core; the point is that each rank does only its share.

    python benchmarks/rank_shares.py               # one process, then `accelerate launch` with 2 gloo ranks
    python benchmarks/rank_shares.py --queries 2400

Prints a table and writes `benchmarks/results/rank_shares.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from report import machine, print_table, write_json

STAGES = ("dedup", "features", "evaluation")


def work(queries: int, out: str) -> None:
    """One rank's part; rank 0 writes the outputs, each rank's share and each stage's wall time."""
    from vit_pipelines.data import embedded
    from vit_pipelines.data.cache import cache_images, resolve_num_proc
    from vit_pipelines.data.sources import load_image_dataset
    from vit_pipelines.dedup import DedupConfig, build_index, join_references, search
    from vit_pipelines.evaluation.classification import evaluate_accuracy
    from vit_pipelines.evaluation.features import extract_features
    from vit_pipelines.models import VisionTransformer, ViTConfig
    from vit_pipelines.training.loop import make_accelerator, process_state

    state = process_state()
    rank, world = state.process_index, state.num_processes
    torch.set_num_threads(resolve_num_proc("auto", world))
    tests = {name: load_image_dataset(f"embedded:{name}", split="test") for name in embedded.DOWNSTREAM_NAMES}
    pretrain = load_image_dataset("embedded:pretrain").select(range(queries))
    config = ViTConfig(image_size=64, patch_size=8, width=96, depth=4, num_heads=3, mlp_dim=384,
                       num_classes=10, representation_size=None)  # fmt: skip
    model = VisionTransformer.from_seed(config, 0)
    cache = cache_images(tests["digits"], "decode")[0]
    accelerator = make_accelerator("no")
    seen = []  # images through the model, counted where features and evaluation both pass
    forward_features = model.forward_features
    model.forward_features = lambda images, **kw: seen.append(len(images)) or forward_features(images, **kw)
    timings, shares, outputs = {}, {}, {}

    state.wait_for_everyone()
    start = time.perf_counter()
    index, _ = build_index(join_references(tests)[0], DedupConfig(num_proc=resolve_num_proc("auto", world)))
    result = search(
        pretrain, index, DedupConfig(num_proc=resolve_num_proc("auto", world)), False, rank, world
    )
    matches = sorted(gather_object([(m.query, m.reference, round(m.score, 5)) for m in result.matches]))
    state.wait_for_everyone()
    timings["dedup"], shares["dedup"], outputs["dedup"] = time.perf_counter() - start, result.queries, matches

    start = time.perf_counter()
    features, labels = extract_features(model, cache, "value_range(-1,1)", batch_size=64)
    state.wait_for_everyone()
    timings["features"], shares["features"] = time.perf_counter() - start, sum(seen)
    outputs["features"] = features.tolist()

    seen.clear()
    start = time.perf_counter()
    accuracy = evaluate_accuracy(model, cache, "value_range(-1,1)", batch_size=64, accelerator=accelerator)
    state.wait_for_everyone()
    timings["evaluation"], shares["evaluation"], outputs["evaluation"] = (
        time.perf_counter() - start,
        sum(seen),
        accuracy,
    )

    gathered = gather_object([{"rank": rank, "shares": shares, "seconds": timings}])
    if state.is_main_process:
        totals = {"dedup": queries, "features": len(cache), "evaluation": len(cache)}
        Path(out).write_text(
            json.dumps({"world": world, "totals": totals, "ranks": gathered, "outputs": outputs})
        )


def launch(ranks: int, queries: int, out: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", str(out), "--queries", str(queries)]
    if ranks > 1:
        command = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(ranks), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", *command[1:]]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "KEDRO_DISABLE_TELEMETRY": "1"}
    subprocess.run(command, env=env, check=True)
    return json.loads(out.read_text())


def run(queries: int = 4_800) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        runs = {n: launch(n, queries, Path(folder) / f"{n}.json") for n in (1, 2)}
    one, two = runs[1]["outputs"], runs[2]["outputs"]
    identical = {
        "dedup": one["dedup"] == two["dedup"],
        "features": bool(np.allclose(one["features"], two["features"], rtol=1e-5, atol=1e-5)),
        "evaluation": one["evaluation"] == two["evaluation"],
    }
    rows = []
    for stage in STAGES:
        for n, result in runs.items():
            rows.append({
                "stage": stage, "ranks": n, "total": result["totals"][stage],
                "per_rank": [r["shares"][stage] for r in result["ranks"]],
                "seconds": max(r["seconds"][stage] for r in result["ranks"]),
                "identical_to_one_process": identical[stage],
            })  # fmt: skip
    return {"benchmark": "rank_shares", "machine": machine(), "queries": queries, "rows": rows}


def report(result: dict[str, Any]) -> list[list[Any]]:
    rows = [
        [r["stage"], r["ranks"], r["total"], " / ".join(map(str, r["per_rank"])), r["seconds"],
         "yes" if r["identical_to_one_process"] else "NO"]
        for r in result["rows"]
    ]  # fmt: skip
    print_table(
        f"each rank's share ({result['machine']['cores']} cores shared among the ranks)",
        ["stage", "ranks", "items", "per rank", "wall s", "outputs = 1 process"],
        rows,
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--queries", type=int, default=4_800, help="embedded pretraining images de-duplicated"
    )
    parser.add_argument("--out", default="benchmarks/results/rank_shares.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work(args.queries, args.worker)
        return
    result = run(args.queries)
    report(result)
    write_json(args.out, result)
    wrong = [r for r in result["rows"] if not r["identical_to_one_process"]]
    uneven = [r for r in result["rows"] if max(r["per_rank"]) > -(-r["total"] // r["ranks"])]
    if wrong or uneven:
        raise SystemExit(f"ranks disagree with one process or do more than their share: {wrong + uneven}")


if __name__ == "__main__":
    main()
