"""Training throughput of this project's ViT against Hugging Face `transformers` ViT, in one process.

Per shape (ViT-Ti/4 at 32 px, batch 128, 5 timed steps per round; ViT-S/16 at 224 px, batch 32, 2 steps per
round; 12 layers, 100 classes) and per
configuration (float32 or bf16 autocast, eager or `torch.compile`), both models run the same training step:
forward, softmax cross-entropy, backward, fused AdamW; glibc keeps freed memory (`keep_freed_memory`, as the
project's training does). Rounds alternate between the models so machine noise hits both
alike; the median images/s counts. The configurations run minutes apart, so every one within 20% of its model's
best then runs again head to head (at least 5 alternating rounds): each model's fastest there is its best, and the
median per-round ratio of the two is the best-vs-best speed-up. The FLOPs of one training step, each model's own
(ours computes the last block for the [class] token alone, ~8% fewer at Ti/4@32), are counted by
`torch.utils.flop_counter` (matmuls, convolutions and attention, forward and backward) and give the achieved
TFLOP/s and the model FLOP utilisation (MFU) against a bf16 matmul peak measured in the same run: at its start for
the sweep, and in every head-to-head round for the head-to-head MFU (median per-round ratio; also against the
highest of those peaks).

Identical maths: from the same initial weights (ours copied into HF's layout) and the same batches, both train
20 steps in bf16 autocast at lr 1e-4 (a smooth descent, 1.46 to 0.20; at 1e-3 the curve on 4 batches is chaotic and
any rounding difference grows to 10-30% within 20 steps, in float32 too); their loss curves must agree within 2%,
or within twice the distance of HF's bf16 curve from our float32 curve (bf16 rounding differs between the
kernels and compounds over the steps); the JSON keeps the three curves.

    python benchmarks/train_throughput.py                 # both shapes
    python benchmarks/train_throughput.py --shapes Ti/4@32 --configs bf16-compiled

Prints a table and writes `benchmarks/results/train_throughput.json` (`benchmarks/run.py` runs everything).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from report import machine, print_table, write_json
from torch.utils.flop_counter import FlopCounterMode

from vit_pipelines.models import VisionTransformer, ViTConfig
from vit_pipelines.models.checkpoints import export_hf
from vit_pipelines.training.loop import keep_freed_memory

SHAPES = {
    "Ti/4@32": dict(variant="Ti/4", image_size=32, batch_size=128, steps=5),
    "S/16@224": dict(variant="S/16", image_size=224, batch_size=32, steps=2),
}
CONFIGS = ("fp32-eager", "bf16-eager", "fp32-compiled", "bf16-compiled")
NUM_CLASSES = 100
PARITY_LR = 1e-4  # the loss-parity run's learning rate (see the module docstring)


def same_weights_hf(model: VisionTransformer) -> torch.nn.Module:
    """`transformers.ViTForImageClassification` with `model`'s shape and weights, through the project's own
    exporter, with its eager attention (faster than its SDPA on CPU; the issue's anchor) and eps 1e-6 as ours."""
    from transformers import ViTForImageClassification

    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)
        return ViTForImageClassification.from_pretrained(folder, attn_implementation="eager")


class Logits(torch.nn.Module):
    """`images → logits` for either model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.is_hf = not isinstance(model, VisionTransformer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits if self.is_hf else self.model(images)


def make_step(
    model: torch.nn.Module, precision: str, compiled: bool, lr: float = 1e-3
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One training step (forward, cross-entropy, backward, AdamW) returning the loss, on the device."""
    net = Logits(model)
    forward = torch.compile(net) if compiled else net
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    return adamw_step(forward, optimizer, "cpu", precision == "bf16")


def adamw_step(
    forward: Callable, optimizer: torch.optim.Optimizer, device_type: str, bf16: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Forward (in bf16 autocast if `bf16`), float32 cross-entropy, backward, `optimizer` step; returns the loss
    on the device."""

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def training_flops(model: torch.nn.Module, batch: int, image_size: tuple[int, int] | None = None) -> int:
    """FLOPs of one training step's forward and backward pass (matmuls, convolutions, attention) as `model` runs
    it: ours computes the last block for the [class] token alone (`vit.Block.forward`), so it counts fewer than
    HF's model of the same shape, which computes every token (pass HF's `image_size`)."""
    images = torch.randn(batch, 3, *(image_size or model.config.image_size))
    labels = torch.zeros(batch, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(Logits(model)(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype = torch.bfloat16, sizes: tuple[int, ...] = (2048, 4096)) -> float:
    """The best TFLOP/s of square `dtype` matmuls of `sizes` on this machine, now."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        repeats = max(2, int(2e11 // (2 * n**3)))
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12)
    return best


def loss_curves(
    config: ViTConfig, batch: int, steps: int = 20, seed: int = 0, lr: float = 1e-3
) -> dict[str, list[float]]:
    """Both models from the same initial weights on the same batches, bf16 autocast: the loss per step; and ours
    in float32, the reference that both bf16 curves round away from."""
    model = VisionTransformer.from_seed(config, seed)
    gen = torch.Generator().manual_seed(seed)
    torch.nn.init.normal_(model.head.weight, std=0.02, generator=gen)  # a zero head learns from step 2 only
    hf = same_weights_hf(model)
    batches = [
        (
            torch.randn(batch, 3, *config.image_size, generator=gen),
            torch.randint(0, 4, (batch,), generator=gen),
        )
        for _ in range(4)
    ]
    for images, labels in batches:  # a learnable signal: the label shifts the image mean
        images += labels.view(-1, 1, 1, 1) * 0.5
    curves = {}
    runs = (
        ("vit_pipelines", model, "bf16"),
        ("transformers", hf, "bf16"),
        ("float32", copy.deepcopy(model), "fp32"),
    )
    for name, net, precision in runs:
        step = make_step(net, precision, compiled=False, lr=lr)
        curves[name] = [step(*batches[i % len(batches)]).item() for i in range(steps)]
    return curves


def timed_rounds(
    steps_fn: dict[str, Callable],
    images: torch.Tensor,
    labels: torch.Tensor,
    rounds: int,
    steps: int,
    probe: Callable[[], float] | None = None,
) -> tuple[dict[str, list[float]], dict[str, float], list[float]]:
    """Images/s of each step function per round, the functions alternating within each round, after a warm-up
    of two steps (compilation, allocator, oneDNN kernels) whose first step's seconds are returned too; and, where
    `probe` is given, its value measured at the end of each round. Each round starts one function further along,
    so the functions share the positions as evenly as the number of rounds allows (in-process A/Bs of two builds
    of our step suggested that the position in the round moves their ratio by up to ~1.5%)."""
    first_step = {}
    for m, step in steps_fn.items():
        start = time.perf_counter()
        step(images, labels).item()
        first_step[m] = time.perf_counter() - start
        step(images, labels).item()
    rates: dict[str, list[float]] = {m: [] for m in steps_fn}
    probed = []
    order = list(steps_fn)
    for r in range(rounds):
        for m in order[r % len(order) :] + order[: r % len(order)]:
            step = steps_fn[m]
            start = time.perf_counter()
            for _ in range(steps):
                loss = step(images, labels)
            loss.item()
            rates[m].append(len(images) * steps / (time.perf_counter() - start))
        if probe is not None:
            probed.append(probe())
    return rates, first_step, probed


def measure_shape(
    name: str, configs: tuple[str, ...], rounds: int, peak: float, seed: int = 0
) -> dict[str, Any]:
    shape = SHAPES[name]
    steps = shape["steps"]
    config = ViTConfig.from_variant(shape["variant"], image_size=shape["image_size"], num_classes=NUM_CLASSES)
    batch = shape["batch_size"]
    # each model's own FLOPs: the TFLOP/s and MFU of what it computes (ours skips work HF does, see training_flops)
    reference = VisionTransformer.from_seed(config, seed)
    flops = {
        "vit_pipelines": training_flops(reference, batch),
        "transformers": training_flops(same_weights_hf(reference), batch, config.image_size),
    }
    tflop_per_image = {m: f / batch / 1e12 for m, f in flops.items()}
    images = torch.randn(batch, 3, *config.image_size)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    rows = {}
    for setting in configs:
        precision, mode = setting.split("-")
        ours = VisionTransformer.from_seed(config, seed)
        models = {"vit_pipelines": ours, "transformers": same_weights_hf(ours)}
        steps_fn = {m: make_step(net, precision, mode == "compiled") for m, net in models.items()}
        rates, compile_seconds, _ = timed_rounds(steps_fn, images, labels, rounds, steps)
        for m, values in rates.items():
            ips = statistics.median(values)
            tflops = ips * tflop_per_image[m]
            rows[f"{m} {setting}"] = {
                "model": m, "precision": precision, "compiled": mode == "compiled",
                "images_per_second": ips, "images_per_second_rounds": values,
                "tflops": tflops, "mfu_vs_bf16_matmul_peak": tflops / peak,
                "first_step_seconds": compile_seconds[m],
            }  # fmt: skip
    # The configurations above ran minutes apart on a shared machine, which can misorder near-ties (one sweep ranked
    # HF's eager bf16 run first where a 3-way rerun found its compiled one 11% faster; another ranked our compiled
    # run, which uses the plain modules, above our eager one). So every configuration within 20% of its model's
    # best runs again, all alternating round by round; each model's best is its fastest there, and the speed-up is
    # the median per-round ratio of those two.
    contenders = {}
    for m in ("vit_pipelines", "transformers"):
        top = max(r["images_per_second"] for r in rows.values() if r["model"] == m)
        contenders |= {
            k: r for k, r in rows.items() if r["model"] == m and r["images_per_second"] >= 0.8 * top
        }
    finals = {}
    for k, r in contenders.items():
        net = VisionTransformer.from_seed(config, seed)
        finals[k] = make_step(net if r["model"] == "vit_pipelines" else same_weights_hf(net), r["precision"], r["compiled"])  # fmt: skip
    # The bf16 matmul peak is measured again in every round, right after the models' steps: on a shared machine
    # one measurement at the start of the run can catch a busy moment (a run that measured 0.84 TFLOP/s against
    # 1.4-2.3 in others gave MFUs of 71%), so the MFU here is the median per-round ratio of our step's TFLOP/s to
    # the peak of the same round.
    final_rates, _, peaks = timed_rounds(
        finals, images, labels, max(rounds, 5), steps, probe=lambda: matmul_peak(sizes=(2048,))
    )
    best = {
        m: max(
            (k for k, r in contenders.items() if r["model"] == m),
            key=lambda k: statistics.median(final_rates[k]),
        )
        for m in ("vit_pipelines", "transformers")
    }
    ours, theirs = final_rates[best["vit_pipelines"]], final_rates[best["transformers"]]
    return {
        "config": config.to_dict(),
        "batch_size": batch,
        "training_flops_per_image": {m: f / batch for m, f in flops.items()},
        "runs": rows,
        "ours_best": rows[best["vit_pipelines"]],
        "transformers_best": rows[best["transformers"]],
        "head_to_head_images_per_second_rounds": final_rates,
        "speedup_best_vs_best": statistics.median(a / b for a, b in zip(ours, theirs, strict=True)),
        "head_to_head_bf16_matmul_peak_tflops_rounds": peaks,
        "ours_best_mfu_per_round_peak": statistics.median(
            rate * tflop_per_image["vit_pipelines"] / peak for rate, peak in zip(ours, peaks, strict=True)
        ),
        "ours_best_mfu_max_peak": statistics.median(ours) * tflop_per_image["vit_pipelines"] / max(peaks),
    }


def run(
    shapes: tuple[str, ...] = tuple(SHAPES),
    configs: tuple[str, ...] = CONFIGS,
    rounds: int = 3,
    parity_steps: int = 20,
) -> dict[str, Any]:
    keep_freed_memory()  # as training does; process-wide, so both models get it (also under benchmarks/run.py)
    peak = matmul_peak(torch.bfloat16)
    fp32_peak = matmul_peak(torch.float32, sizes=(2048,))
    result: dict[str, Any] = {
        "benchmark": "train_throughput",
        "machine": machine(),
        "bf16_matmul_peak_tflops": peak,
        "fp32_matmul_peak_tflops": fp32_peak,
        "shapes": {name: measure_shape(name, configs, rounds, peak) for name in shapes},
    }
    first = SHAPES[shapes[0]]
    parity_config = ViTConfig.from_variant(first["variant"], image_size=first["image_size"], num_classes=4)
    curves = loss_curves(parity_config, first["batch_size"], parity_steps, lr=PARITY_LR)

    def gap(a: str, b: str) -> float:
        return max(abs(x - y) / abs(y) for x, y in zip(curves[a], curves[b], strict=True))

    # Two bf16 runs of one function drift apart as each drifts from float32: they agree when their gap is
    # within 2% or within twice the drift of HF's bf16 curve from the float32 one.
    hf_drift = gap("transformers", "float32")
    result["loss_parity"] = {
        "shape": shapes[0],
        "steps": parity_steps,
        "lr": PARITY_LR,
        "max_relative_difference": gap("vit_pipelines", "transformers"),
        "bf16_drift_from_float32": {
            "vit_pipelines": gap("vit_pipelines", "float32"),
            "transformers": hf_drift,
        },
        "within_tolerance": gap("vit_pipelines", "transformers") <= max(0.02, 2 * hf_drift),
        "curves": curves,
    }
    return result


def report(result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, shape in result["shapes"].items():
        for label, r in shape["runs"].items():
            rows.append(
                [
                    f"{name} {label}",
                    r["images_per_second"],
                    r["tflops"],
                    f"{100 * r['mfu_vs_bf16_matmul_peak']:.0f}%",
                ]
            )
    print_table(
        f"training throughput (bf16 matmul peak {result['bf16_matmul_peak_tflops']:.2f} TFLOP/s, "
        f"fp32 {result['fp32_matmul_peak_tflops']:.2f})",
        ["model / configuration", "img/s", "TFLOP/s", "MFU"],
        rows,
    )
    for name, shape in result["shapes"].items():
        rerun = ", ".join(
            f"{k} {statistics.median(v):.0f}"
            for k, v in shape["head_to_head_images_per_second_rounds"].items()
        )
        ours, theirs = shape["ours_best"], shape["transformers_best"]
        peaks = shape["head_to_head_bf16_matmul_peak_tflops_rounds"]
        print(
            f"{name}: best vs best, head to head {shape['speedup_best_vs_best']:.2f}x (ours {ours['precision']}, "
            f"compiled={ours['compiled']} vs HF {theirs['precision']}, compiled={theirs['compiled']}; "
            f"rerun img/s: {rerun}); our MFU there {100 * shape['ours_best_mfu_per_round_peak']:.0f}% of each "
            f"round's bf16 matmul peak ({min(peaks):.2f}-{max(peaks):.2f} TFLOP/s), "
            f"{100 * shape['ours_best_mfu_max_peak']:.0f}% of the highest"
        )
    parity = result["loss_parity"]
    print(
        f"loss curves over {parity['steps']} steps: max relative difference {parity['max_relative_difference']:.4f} "
        f"(bf16 drift from float32: ours {parity['bf16_drift_from_float32']['vit_pipelines']:.4f}, "
        f"HF {parity['bf16_drift_from_float32']['transformers']:.4f}; within tolerance: {parity['within_tolerance']})"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    result = run(tuple(args.shapes), tuple(args.configs), args.rounds)
    report(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
