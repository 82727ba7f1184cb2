"""The benchmarks' own arithmetic: the FLOPs behind the reported TFLOP/s and MFU, the timed rounds, and the printed
tables."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_throughput  # noqa: E402
from report import print_table  # noqa: E402

from vit_pipelines.models import VisionTransformer, ViTConfig  # noqa: E402


@pytest.mark.parametrize("batch", [1, 3])
def test_training_flops_match_the_transformer_formula(batch):
    layers, d, mlp, classes = 12, 192, 768, 100
    config = ViTConfig.from_variant("Ti/4", image_size=32, num_classes=classes)
    n = config.grid_size[0] * config.grid_size[1] + 1  # 64 patches + [class]
    per_layer = 2 * n * (4 * d * d + 2 * d * mlp) + 2 * 2 * n * n * d  # qkv + proj + MLP, then QKᵀ and AV
    patch_embed = 64 * 2 * (3 * 4 * 4) * d
    forward = layers * per_layer + patch_embed + 2 * d * classes
    # backward: twice the forward, except the patch conv, which needs no gradient for the input images
    expected = 3 * forward - patch_embed
    flops = train_throughput.training_flops(VisionTransformer.from_seed(config, 0), batch)
    assert flops == batch * expected
    assert expected == pytest.approx(2.19e9, rel=1e-3)


def test_tables_align_numbers_right(capsys):
    print_table("t", ["name", "img/s"], [["ours", 1234.5], ["theirs", 7.25]])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "t" and lines[2:] == [
        "name    img/s",
        "------  -----",
        "ours    1,234",
        "theirs   7.25",
    ]


def test_timed_rounds_alternate_the_steps_and_probe_once_per_round():
    calls = []

    def step(name):
        def run(images, labels):
            calls.append(name)
            return torch.zeros(())

        return run

    images, labels = torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    rates, first, probed = train_throughput.timed_rounds(
        {"a": step("a"), "b": step("b")},
        images,
        labels,
        rounds=3,
        steps=2,
        probe=lambda: calls.append("p") or 7.0,
    )
    # two warm-up steps each, then the rounds, each followed by the probe
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b", "p"] * 3
    assert probed == [7.0] * 3 and set(first) == {"a", "b"}
    assert len(rates["a"]) == len(rates["b"]) == 3 and all(r > 0 for r in rates["a"] + rates["b"])
