"""The training step of ViT-B/16 and ViT-L/16 at 224 px on a GPU: this project's ViT against timm's and Hugging
Face `transformers`' of the same shape, in one process with the same settings (bf16 autocast, fused AdamW, the
same batch), eager and `torch.compile`d, with and without activation checkpointing.

Per model and configuration: images/s (median of alternating rounds, so machine noise hits every model alike),
achieved TFLOP/s of the model's own training FLOPs (`torch.utils.flop_counter`: ours computes the last block for
the [class] token alone, so it counts fewer), MFU against the GPU's bf16 dense peak (its data-sheet figure where
the card is known, else the matmul peak measured here) and peak memory. With `--sharding ddp fsdp`, under
`accelerate launch --multi_gpu --num_processes N`, the data-parallel step of this project's model instead,
replicated and sharded (`train.sharding`): global images/s and images/s per GPU, to set against the N=1 figure
for the scaling efficiency, and the training state and peak memory each GPU holds.

    python benchmarks/gpu_throughput.py                                  # B/16 and L/16, every configuration
    python benchmarks/gpu_throughput.py --models B/16 --configs eager compiled
    accelerate launch --multi_gpu --num_processes 8 benchmarks/gpu_throughput.py --sharding ddp fsdp
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 benchmarks/gpu_throughput.py \
        --sharding ddp fsdp --models B/16 --batch 2 --steps 2       # two CPU processes (gloo)
    python benchmarks/gpu_throughput.py --device cpu --models Ti/16 --image-size 32 --batch 4   # a smoke run

Prints a table and writes `benchmarks/results/gpu_throughput.json` (`--sharding`: `gpu_scaling.json`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from report import machine, print_table, write_json
from torch.utils.flop_counter import FlopCounterMode
from train_throughput import adamw_step, matmul_peak, timed_rounds

from vit_pipelines.models import VisionTransformer, ViTConfig

RESULTS = Path(__file__).parent / "results"
CONFIGS = ("eager", "compiled", "eager+ckpt", "compiled+ckpt")
BATCH = {"B/16": 128, "L/16": 64}  # per GPU; H100/H200 hold either with room for every configuration
NUM_CLASSES = 1000
TIMM_NAMES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}
# bf16 dense tensor-core peaks (data sheets, without sparsity), by a part of torch.cuda.get_device_name()
DENSE_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L4", 121.0))


def dense_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in DENSE_BF16_TFLOPS if part in name), None)


def build(kind: str, variant: str, image_size: int) -> torch.nn.Module | None:
    """`kind` ("vit_pipelines", "timm", "transformers") of `variant`'s shape; None when the library is absent."""
    config = ViTConfig.from_variant(variant, image_size=image_size, num_classes=NUM_CLASSES)
    if kind == "vit_pipelines":
        return VisionTransformer(config)
    if kind == "timm":
        try:
            import timm
        except ImportError:
            return None
        size, patch = variant.split("/")
        name = f"vit_{TIMM_NAMES[size]}_patch{patch}_224"
        return timm.create_model(name, img_size=image_size, num_classes=NUM_CLASSES)
    import transformers

    hf = transformers.ViTConfig(
        hidden_size=config.width,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim,
        image_size=image_size,
        patch_size=config.patch_size[0],
        num_labels=NUM_CLASSES,
        layer_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    return transformers.ViTForImageClassification(hf)


def logits_of(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if model.__class__.__module__.startswith("transformers"):
        return lambda images: model(pixel_values=images).logits
    return model


def checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Each library's own per-block activation checkpointing."""
    if isinstance(model, VisionTransformer):
        model.activation_checkpointing = on
    elif hasattr(model, "set_grad_checkpointing"):  # timm
        model.set_grad_checkpointing(on)
    elif on:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()


def make_step(model: torch.nn.Module, device: torch.device, compiled: bool) -> Callable:
    """Forward in bf16 autocast, float32 cross-entropy, backward, fused AdamW; returns the loss on the device."""
    forward = logits_of(model)
    forward = torch.compile(forward) if compiled else forward
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return adamw_step(forward, optimizer, device.type, bf16=True)


def step_flops(model: torch.nn.Module, image_size: int, device: torch.device) -> int:
    """FLOPs of one image's training step (forward and backward) as `model` computes it."""
    images = torch.randn(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(logits_of(model)(images), torch.zeros(1, dtype=torch.long, device=device)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_memory(
    step: Callable, images: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> float | None:
    """GiB allocated at most over two steps of `step` (after its warm-up), on CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step(images, labels).item()
    return torch.cuda.max_memory_allocated(device) / 2**30


def measure(
    variant: str,
    configs: list[str],
    batch: int,
    image_size: int,
    rounds: int,
    steps: int,
    device: torch.device,
) -> dict[str, Any]:
    """Every available model of `variant` in every configuration; the rounds alternate between the models."""
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    models = {kind: build(kind, variant, image_size) for kind in ("vit_pipelines", "timm", "transformers")}
    missing = [kind for kind, model in models.items() if model is None]
    models = {kind: model.to(device) for kind, model in models.items() if model is not None}
    flops = {kind: step_flops(model, image_size, device) * batch for kind, model in models.items()}
    rows: dict[str, dict[str, Any]] = {}
    for config in configs:
        steps_fn, memory = {}, {}
        for kind, model in models.items():
            checkpointing(model, config.endswith("+ckpt"))
            steps_fn[kind] = make_step(model, device, config.startswith("compiled"))
            steps_fn[kind](images, labels).item()  # compile and allocate before measuring memory
            memory[kind] = peak_memory(steps_fn[kind], images, labels, device)
        rates, first_step, _ = timed_rounds(steps_fn, images, labels, rounds, steps)
        for kind, per_round in rates.items():
            rate = statistics.median(per_round)
            rows[f"{kind} {config}"] = {
                "model": kind,
                "config": config,
                "images_per_second": rate,
                "tflops": flops[kind] / batch * rate / 1e12,
                "peak_memory_gib": memory[kind],
                "first_step_seconds": first_step[kind],
            }
    return {
        "variant": variant,
        "batch": batch,
        "image_size": image_size,
        "rows": rows,
        "not_installed": missing,
    }


def measure_data_parallel(
    variant: str, batch: int, image_size: int, steps: int, sharding: str
) -> dict[str, Any] | None:
    """This project's model and loop settings under `accelerate launch`, `batch` per process, replicated (ddp)
    or sharded (fsdp, `train.sharding`): global and per-process images/s, and per process the bytes of training
    state it holds (weights, gradients, Adam moments) and its peak memory. Returns on the main process only."""
    import resource

    from accelerate.utils import gather_object

    from vit_pipelines.training.loop import make_accelerator
    from vit_pipelines.training.objectives import Classification
    from vit_pipelines.training.sharding import local, shard

    accelerator = make_accelerator("bf16")
    device = accelerator.device
    config = ViTConfig.from_variant(variant, image_size=image_size, num_classes=NUM_CLASSES)
    objective = Classification(VisionTransformer.from_seed(config, 0))
    if sharding == "fsdp":
        shard(objective, device)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4, fused=True)
    if sharding == "fsdp":
        optimizer = accelerator.prepare(optimizer)
    else:
        objective, optimizer = accelerator.prepare(objective, optimizer)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step() -> torch.Tensor:
        with accelerator.autocast():
            loss = objective(images, labels).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: counted in the state below
        return loss.detach()

    for _ in range(3):
        step().item()
    accelerator.wait_for_everyone()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    params = [local(p) for p in objective.parameters()]
    tensors = [*params, *(local(p.grad) for p in objective.parameters()), *(
        local(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()
    )]  # fmt: skip
    state_gib = sum(t.numel() * t.element_size() for t in tensors) / 2**30
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # the process's resident peak (kilobytes on Linux)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    per_rank = gather_object([(state_gib, peak_gib)])
    world = accelerator.num_processes
    if not accelerator.is_main_process:
        return None
    total = world * batch * steps / seconds
    return {"variant": variant, "sharding": sharding, "processes": world, "batch_per_process": batch,
            "images_per_second": total, "images_per_second_per_process": total / world,
            "state_gib_per_process": max(s for s, _ in per_rank),
            "peak_gib_per_process": max(p for _, p in per_rank),
            "peak_source": "cuda max_memory_allocated" if device.type == "cuda" else "RSS"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["B/16", "L/16"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--batch", type=int, help="per GPU (default: 128 for B/16, 64 for L/16)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sharding",
        nargs="+",
        choices=("ddp", "fsdp"),
        help="under accelerate launch: data-parallel scaling",
    )
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_*.json)")
    args = parser.parse_args()
    if args.sharding:
        results = [
            measure_data_parallel(v, args.batch or BATCH.get(v, 32), args.image_size, args.steps, sharding)
            for v in args.models
            for sharding in args.sharding
        ]
        if results[0] is not None:
            rows = [[r["variant"], r["sharding"], r["processes"], r["batch_per_process"], r["images_per_second"],
                     r["images_per_second_per_process"], r["state_gib_per_process"],
                     r["peak_gib_per_process"]] for r in results]  # fmt: skip
            header = ["model", "sharding", "processes", "batch each", "img/s", "img/s each", "state GiB each",
                      f"peak GiB each ({results[0]['peak_source']})"]  # fmt: skip
            print_table("data-parallel training step (bf16)", header, rows)
            write_json(args.out or RESULTS / "gpu_scaling.json", {"machine": machine(), "results": results})
        return
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    measured = matmul_peak() if device.type == "cpu" else cuda_matmul_peak(device)
    sheet = dense_peak(device)
    peak = sheet or measured
    results = []
    for variant in args.models:
        batch = args.batch or BATCH.get(variant, 32)
        result = measure(variant, args.configs, batch, args.image_size, args.rounds, args.steps, device)
        results.append(result)
        rows = [
            [name, r["images_per_second"], r["tflops"], f"{r['tflops'] / peak:.1%}", r["peak_memory_gib"]]
            for name, r in result["rows"].items()
        ]
        title = f"{variant} at {args.image_size} px, batch {batch}, bf16, {machine()['gpu'] or device}"
        if result["not_installed"]:
            title += f" (not installed: {', '.join(result['not_installed'])})"
        print_table(title, ["model and config", "img/s", "TFLOP/s", "MFU", "peak GiB"], rows)
    print(f"\nMFU against {peak:.4g} TFLOP/s ({'data sheet' if sheet else 'measured bf16 matmul peak'})")
    write_json(
        args.out or RESULTS / "gpu_throughput.json",
        {"machine": machine(), "peak_tflops": peak, "peak_source": "data sheet" if sheet else "measured",
         "measured_matmul_tflops": measured, "results": results},
    )  # fmt: skip


def cuda_matmul_peak(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """The TFLOP/s of square bf16 matmuls on `device`, now."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


if __name__ == "__main__":
    main()
