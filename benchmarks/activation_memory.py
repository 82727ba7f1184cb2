"""Peak memory of one training step with and without activation checkpointing (`train.activation_checkpointing`):
ViT-B/16 at 224 px, batch 32, float32, on the CPU, each setting in a fresh process.

Per setting: the step's peak resident memory above what the process held before it (the model, its gradients
and AdamW's moments are allocated first), the bytes autograd kept for the backward pass, the step's seconds, and
the gradients' norm, which must agree between the settings (the same numbers, recomputed).

    python benchmarks/activation_memory.py
    python benchmarks/activation_memory.py --model Ti/16 --batch 4        # a smoke run

Prints a table and writes `benchmarks/results/activation_memory.json`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from report import machine, print_table, write_json

from vit_pipelines.models import VisionTransformer, ViTConfig
from vit_pipelines.training.loop import keep_freed_memory

RESULTS = Path(__file__).parent / "results"


def one_step(variant: str, batch: int, image_size: int, checkpointing: bool) -> dict[str, Any]:
    """A float32 training step in this process; its memory is measured against what the process held before."""
    keep_freed_memory()  # as training does: freed activations are reused, not returned and faulted in again
    config = ViTConfig.from_variant(variant, image_size=image_size, num_classes=1000)
    model = VisionTransformer.from_seed(config, 0).train()
    torch.manual_seed(0)  # the same head in both processes
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a zero head would give most weights no gradient
    model.activation_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for p in model.parameters():  # gradients and moments allocated before the measured step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % 1000
    before = psutil.Process().memory_info().rss
    saved = []
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    return {"activation_checkpointing": checkpointing, "step_peak_gib": (peak - before) / 2**30,
            "saved_for_backward_gib": sum(saved) / 2**30, "seconds": seconds, "grad_norm": norm,
            "loss": loss.item()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="B/16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", default=str(RESULTS / "activation_memory.json"))
    parser.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = one_step(args.model, args.batch, args.image_size, args.child == "on")
        print(json.dumps(result))
        return
    rows = []
    for setting in ("off", "on"):
        command = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
                   "--image-size", str(args.image_size), "--child", setting]  # fmt: skip
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    off, on = rows
    lower = 1 - on["step_peak_gib"] / off["step_peak_gib"]
    print_table(
        f"{args.model} at {args.image_size} px, batch {args.batch}, float32, one training step on the CPU",
        ["activation checkpointing", "step peak GiB", "kept for backward GiB", "seconds", "gradient norm"],
        [
            [
                r["activation_checkpointing"],
                r["step_peak_gib"],
                r["saved_for_backward_gib"],
                r["seconds"],
                f"{r['grad_norm']:.6g}",
            ]
            for r in rows
        ],  # fmt: skip
    )
    print(f"\npeak {lower:.0%} lower with activation checkpointing; gradient norms differ by "
          f"{abs(on['grad_norm'] - off['grad_norm']) / off['grad_norm']:.1e} (relative)")  # fmt: skip
    write_json(args.out, {"machine": machine(), "model": args.model, "batch": args.batch,
                          "image_size": args.image_size, "peak_lower_fraction": lower, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
