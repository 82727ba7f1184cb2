"""Training throughput of this project's ViT against Hugging Face `transformers` ViT, in one process.

Both models get the same shape (layers, width, heads, MLP, patch, image size, classes) and run the same
training step (forward, softmax cross-entropy, backward, AdamW step) under the same autocast. Rounds alternate
between the two so machine noise hits both alike; the table reports the median images/s and the ratio.

    pip install -c constraints-cpu.txt -e ".[bench]"
    python benchmarks/train_throughput.py                      # the pretrain default: Ti/4, depth 6, 32 px
    python benchmarks/train_throughput.py --variant B/16 --image-size 224 --depth 2 --batch-size 16

Prints a table and writes `benchmarks/results/train_throughput.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vit_pipelines.models import VisionTransformer, ViTConfig
from vit_pipelines.training.loop import resolve_mixed_precision


def hf_vit(config: ViTConfig) -> torch.nn.Module:
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    hf = HFConfig(
        hidden_size=config.width, num_hidden_layers=config.depth, num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim, image_size=config.image_size[0], patch_size=config.patch_size[0],
        num_labels=config.num_classes, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
    )  # fmt: skip
    model = ViTForImageClassification(hf)
    forward = model.forward
    model.forward = lambda images: forward(pixel_values=images).logits  # type: ignore[method-assign]
    return model


def step_fn(
    model: torch.nn.Module, batch: int, config: ViTConfig, dtype: torch.dtype | None
) -> Callable[[], None]:
    images = torch.randn(batch, 3, *config.image_size)
    labels = torch.randint(0, config.num_classes, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def images_per_second(step: Callable[[], None], batch: int, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="Ti/4")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default="auto", help="auto | bf16 | no")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()

    config = ViTConfig.from_variant(
        args.variant, image_size=args.image_size, num_classes=100, depth=args.depth
    )
    precision = resolve_mixed_precision(args.precision)
    dtype = {"bf16": torch.bfloat16, "no": None}[precision]
    torch.manual_seed(0)
    models = {"vit_pipelines": VisionTransformer(config), "transformers": hf_vit(config)}
    steps = {name: step_fn(model, args.batch_size, config, dtype) for name, model in models.items()}
    for step in steps.values():  # warm-up: allocator, oneDNN kernels
        step()
        step()
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rates[name].append(images_per_second(step, args.batch_size, args.steps))
    median = {name: statistics.median(values) for name, values in rates.items()}
    ratio = median["vit_pipelines"] / median["transformers"]

    print(
        f"\n{config.variant} depth {config.depth} at {config.image_size[0]}px, batch {args.batch_size}, {precision}"
    )
    print(f"{'model':<16}{'images/s (median)':>20}{'min':>10}{'max':>10}")
    for name, values in rates.items():
        print(f"{name:<16}{median[name]:>20.1f}{min(values):>10.1f}{max(values):>10.1f}")
    print(f"{'ratio':<16}{ratio:>20.2f}   (vit_pipelines / transformers)")

    result = {
        "benchmark": "train_throughput",
        "config": config.to_dict(),
        "batch_size": args.batch_size,
        "precision": precision,
        "images_per_second": rates,
        "median_images_per_second": median,
        "ratio_vs_transformers": ratio,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
