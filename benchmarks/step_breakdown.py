"""Where the fused CPU block's training step goes: time, bytes and FLOPs per kernel and per matmul, in one process.

The training step of the training benchmark (this project's ViT, bf16 autocast, forward, cross-entropy, backward,
fused AdamW; ViT-Ti/4 at 32 px, batch 128 by default) runs with every call that `models/fused_cpu.py` makes timed:
each compiled kernel (`models/csrc/fused_cpu.cpp`) and each oneDNN matmul (`torch.mm`, named by its operands'
shapes, ᵀ marking a transposed view). Per call it also counts the bytes of the tensors going in and out (the
kernels' own scratch, which stays in cache, is not counted) and, for matmuls, the FLOPs: bytes per second beside the
machine's copy bandwidth (a 256 MiB float32 copy, measured in the same run) tells the calls bound by memory from
the ones bound by arithmetic. "everything else" is the rest of the step: patch embedding, head, loss, AdamW,
autograd. A timer adds about a microsecond to each of the ~230 calls of a Ti/4 step.

It also bounds what this design can reach: the step's model FLOPs (`torch.utils.flop_counter`) all at the rate the
block's oneDNN matmuls reached, plus every byte the kernels read and write at the copy bandwidth, one after the
other (each kernel is a pass over memory between matmuls), is a step no implementation of these kernels beats;
its MFU, against a bf16 matmul peak measured right after the steps, is the design's ceiling beside the step's own.

    python benchmarks/step_breakdown.py
    python benchmarks/step_breakdown.py --variant S/16 --image-size 224 --batch 32 --steps 3

Prints a table and writes `benchmarks/results/step_breakdown.json` (`benchmarks/run.py` runs everything). Needs
an AVX-512 CPU, where the fused block runs; elsewhere it reports that there is nothing to break down.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from report import machine, print_table, write_json
from train_throughput import make_step, matmul_peak, training_flops

from vit_pipelines.models import VisionTransformer, ViTConfig, fused_cpu
from vit_pipelines.training.loop import keep_freed_memory


class OpTimers:
    """Seconds, calls, bytes and FLOPs per named call, while `on`."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.flops: Counter[str] = Counter()
        self.on = False

    def wrap(self, name: str, fn: Callable[..., Any], flops: int = 0) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            self.bytes[name] += tensor_bytes(args) + tensor_bytes(out)
            self.flops[name] += flops
            return out

        return timed


def tensor_bytes(values: Any) -> int:
    """Bytes of the tensors in a value, a tuple or a list of them."""
    if isinstance(values, torch.Tensor):
        return values.numel() * values.element_size()
    if isinstance(values, (tuple, list)):
        return sum(tensor_bytes(v) for v in values)
    return 0


def matmul_name(a: torch.Tensor, b: torch.Tensor) -> str:
    def operand(t: torch.Tensor) -> str:
        return "[" + "x".join(map(str, t.shape)) + "]" + ("" if t.is_contiguous() else "ᵀ")

    return f"mm {operand(a)}·{operand(b)}"


class _TimedKernels:
    """The compiled kernels module with every function timed."""

    def __init__(self, kernels: Any, timers: OpTimers) -> None:
        self._kernels, self._timers = kernels, timers

    def __getattr__(self, name: str) -> Any:
        return self._timers.wrap(name, getattr(self._kernels, name))


class _TimedTorch:
    """`torch` as `fused_cpu` sees it, with `torch.mm` timed per operand shapes."""

    def __init__(self, timers: OpTimers) -> None:
        self._timers = timers

    def __getattr__(self, name: str) -> Any:
        if name != "mm":
            return getattr(torch, name)

        def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            return self._timers.wrap(matmul_name(a, b), torch.mm, flops)(a, b)

        return mm


@contextlib.contextmanager
def timed_fused_block(timers: OpTimers) -> Iterator[None]:
    """Inside: the fused block's kernels and matmuls report to `timers` (while `timers.on`)."""
    kernels = fused_cpu.kernels()
    saved = fused_cpu._kernels, fused_cpu.torch
    fused_cpu._kernels, fused_cpu.torch = _TimedKernels(kernels, timers), _TimedTorch(timers)
    try:
        yield
    finally:
        fused_cpu._kernels, fused_cpu.torch = saved


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """GB/s (bytes read plus bytes written) of the best of `repeats` float32 copies of `mib` MiB, all threads."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def run(
    variant: str = "Ti/4", image_size: int = 32, batch: int = 128, steps: int = 10, warmup: int = 3
) -> dict[str, Any]:
    keep_freed_memory()  # as training does
    config = ViTConfig.from_variant(variant, image_size=image_size, num_classes=100)
    result: dict[str, Any] = {
        "benchmark": "step_breakdown",
        "machine": machine(),
        "shape": f"{variant}@{image_size}",
        "batch": batch,
        "steps": steps,
    }
    if fused_cpu.kernels() is None:
        result["skipped"] = "the fused CPU block does not run here (it needs AVX-512): nothing to break down"
        return result
    model = VisionTransformer.from_seed(config, 0)
    step = make_step(model, "bf16", compiled=False)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, config.num_classes, (batch,), generator=gen)
    timers = OpTimers()
    step_seconds = []
    with timed_fused_block(timers):
        for _ in range(warmup):
            step(images, labels)
        timers.on = True
        for _ in range(steps):
            start = time.perf_counter()
            step(images, labels)
            step_seconds.append(time.perf_counter() - start)
        timers.on = False
    total = sum(step_seconds)
    ops = {
        name: {
            "kind": "matmul" if timers.flops[name] else "kernel",
            "calls_per_step": timers.calls[name] / steps,
            "ms_per_step": 1e3 * seconds / steps,
            "share_of_step": seconds / total,
            "bytes_per_call": timers.bytes[name] // timers.calls[name],
            "gb_per_second": timers.bytes[name] / seconds / 1e9,
            "tflops": timers.flops[name] / seconds / 1e12 if timers.flops[name] else None,
        }
        for name, seconds in sorted(timers.seconds.items(), key=lambda kv: -kv[1])
    }
    covered = sum(timers.seconds.values())
    peak = matmul_peak(sizes=(2048,))
    bandwidth = copy_bandwidth()
    result.update(
        {
            "step_ms": 1e3 * total / steps,
            "images_per_second": batch * steps / total,
            "copy_bandwidth_gb_per_second": bandwidth,
            "bf16_matmul_peak_tflops": peak,
            "ceiling": design_ceiling(ops, training_flops(model, batch), bandwidth, peak, total / steps),
            "ops": ops,
            "share_of_step": {
                kind: sum(op["share_of_step"] for op in ops.values() if op["kind"] == kind)
                for kind in ("matmul", "kernel")
            }
            | {"everything else": 1 - covered / total},
        }
    )
    return result


def design_ceiling(
    ops: dict[str, dict[str, Any]], flops: int, bandwidth: float, peak: float, step_seconds: float
) -> dict[str, float]:
    """The shortest step of this design (see the module's doc) and the MFU of it and of the measured step."""
    matmuls = [op for op in ops.values() if op["kind"] == "matmul"]
    matmul_rate = sum(op["tflops"] * op["ms_per_step"] for op in matmuls) / sum(
        op["ms_per_step"] for op in matmuls
    )
    kernel_bytes = sum(
        op["bytes_per_call"] * op["calls_per_step"] for op in ops.values() if op["kind"] == "kernel"
    )
    arithmetic_ms, memory_ms = flops / matmul_rate / 1e9, kernel_bytes / bandwidth / 1e6
    return {
        "model_gflop_per_step": flops / 1e9,
        "matmul_tflops": matmul_rate,
        "kernel_gb_per_step": kernel_bytes / 1e9,
        "arithmetic_ms": arithmetic_ms,
        "memory_ms": memory_ms,
        "step_ms": arithmetic_ms + memory_ms,
        "mfu": flops / ((arithmetic_ms + memory_ms) / 1e3) / (peak * 1e12),
        "measured_mfu": flops / step_seconds / (peak * 1e12),
    }


def report(result: dict[str, Any]) -> list[list[Any]]:
    if "skipped" in result:
        print(f"\nstep breakdown: {result['skipped']}")
        return []
    rows = [
        [
            name,
            op["calls_per_step"],
            op["ms_per_step"],
            f"{100 * op['share_of_step']:.1f}%",
            op["gb_per_second"],
            op["tflops"],
        ]
        for name, op in result["ops"].items()
    ]
    shares = result["share_of_step"]
    rest = shares["everything else"]
    rows.append(["everything else", None, rest * result["step_ms"], f"{100 * rest:.1f}%", None, None])
    print_table(
        f"{result['shape']} batch {result['batch']}: {result['step_ms']:.0f} ms a step "
        f"({result['images_per_second']:.0f} img/s over {result['steps']} steps); matmuls "
        f"{100 * shares['matmul']:.0f}%, fused kernels {100 * shares['kernel']:.0f}%; copy bandwidth "
        f"{result['copy_bandwidth_gb_per_second']:.1f} GB/s",
        ["call", "calls/step", "ms/step", "of step", "GB/s in+out", "TFLOP/s"],
        rows,
    )
    c = result["ceiling"]
    print(
        f"this step's MFU {100 * c['measured_mfu']:.0f}% of the bf16 matmul peak measured after it "
        f"({result['bf16_matmul_peak_tflops']:.2f} TFLOP/s). The design's floor: {c['model_gflop_per_step']:.0f} "
        f"GFLOP at the matmuls' {c['matmul_tflops']:.2f} TFLOP/s ({c['arithmetic_ms']:.0f} ms) + the kernels' "
        f"{c['kernel_gb_per_step']:.2f} GB at the copy bandwidth ({c['memory_ms']:.0f} ms) = {c['step_ms']:.0f} ms a "
        f"step, MFU {100 * c['mfu']:.0f}% at most"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="Ti/4")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/step_breakdown.json")
    args = parser.parse_args()
    result = run(args.variant, args.image_size, args.batch, args.steps)
    report(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
