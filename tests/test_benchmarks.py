"""The benchmarks' own arithmetic: the FLOPs behind the reported TFLOP/s and MFU, the timed rounds, and the printed
tables."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import activation_memory  # noqa: E402
import dedup_scale  # noqa: E402
import gpu_throughput  # noqa: E402
import step_breakdown  # noqa: E402
import train_throughput  # noqa: E402
from report import print_table  # noqa: E402

from vit_pipelines.models import VisionTransformer, ViTConfig, fused_cpu  # noqa: E402


@pytest.mark.parametrize("batch", [1, 3])
def test_training_flops_match_the_transformer_formula(batch):
    layers, d, mlp, classes = 12, 192, 768, 100
    config = ViTConfig.from_variant("Ti/4", image_size=32, num_classes=classes)
    n = config.grid_size[0] * config.grid_size[1] + 1  # 64 patches + [class]
    per_layer = 2 * n * (4 * d * d + 2 * d * mlp) + 2 * 2 * n * n * d  # qkv + proj + MLP, then QKᵀ and AV
    # ours: the last block computes the [class] token alone, its query carried through the key weights onto every
    # token and the attention-weighted tokens through the value weights: per head, D-vectors, no [N, 2D] keys and
    # values (q, W_kᵀq and W_v·Σpx, then proj and MLP, each one row; the scores and Σpx, one row per head)
    heads = config.num_heads
    last_layer = 2 * (4 * d * d + 2 * d * mlp) + 2 * 2 * heads * n * d
    patch_embed = 64 * 2 * (3 * 4 * 4) * d
    full = layers * per_layer + patch_embed + 2 * d * classes
    ours = full - per_layer + last_layer
    # backward: twice the forward, except the patch conv, which needs no gradient for the input images
    model = VisionTransformer.from_seed(config, 0)
    assert train_throughput.training_flops(model, batch) == batch * (3 * ours - patch_embed)
    hf = train_throughput.same_weights_hf(model)
    assert train_throughput.training_flops(hf, batch, config.image_size) == batch * (3 * full - patch_embed)
    assert 3 * full - patch_embed == pytest.approx(2.19e9, rel=1e-3)
    assert (3 * ours - patch_embed) / (3 * full - patch_embed) == pytest.approx(0.918, abs=1e-3)


def test_tables_align_numbers_right(capsys):
    print_table("t", ["name", "img/s"], [["ours", 1234.5], ["theirs", 7.25]])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "t" and lines[2:] == [
        "name    img/s",
        "------  -----",
        "ours    1,234",
        "theirs   7.25",
    ]


def test_timed_rounds_alternate_the_steps_in_turn_and_probe_once_per_round():
    calls = []

    def step(name):
        def run(images, labels):
            calls.append(name)
            return torch.zeros(())

        return run

    images, labels = torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    rates, first, probed = train_throughput.timed_rounds(
        {"a": step("a"), "b": step("b"), "c": step("c")},
        images,
        labels,
        rounds=4,
        steps=2,
        probe=lambda: calls.append("p") or 7.0,
    )
    # two warm-up steps each, then the rounds, each starting one step function further along and followed by the
    # probe, so each function runs first, second and third alike
    rounds = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    want = ["a", "a", "b", "b", "c", "c"]
    for order in rounds:
        want += [m for m in order for _ in range(2)] + ["p"]
    assert calls == want
    assert probed == [7.0] * 4 and set(first) == {"a", "b", "c"}
    assert all(len(rates[m]) == 4 and all(r > 0 for r in rates[m]) for m in "abc")


@pytest.mark.skipif(
    fused_cpu.kernels() is None, reason="the fused CPU block needs AVX-512 and a C++ compiler"
)
def test_step_breakdown_times_every_call_of_the_fused_block_with_its_bytes_and_flops():
    # Ti/4 at 16 px: 16 patches + [class]
    batch, tokens, width, heads, hidden, layers = 2, 17, 192, 3, 768, 12
    result = step_breakdown.run("Ti/4", image_size=16, batch=batch, steps=2, warmup=1)
    ops = result["ops"]
    fused = layers - 1  # the last block computes the [class] token alone: plain modules, but its layer norm
    # per fused layer: 4 matmuls forward, 4 backward (the kernels sum the weight gradients); one attention kernel each
    # way; two residual adds, the first computing the second layer norm, the second the next layer's first one (so
    # only the first layer runs a layer norm of its own); two layer-norm backward passes, the first layer norm's
    # also computing the previous layer's fc2 gradients; the last block's first layer norm does the same for the
    # last fused layer (so no layer runs cast_colsum)
    assert sum(op["calls_per_step"] for op in ops.values() if op["kind"] == "matmul") == 8 * fused
    assert ops["attention_fwd"]["calls_per_step"] == ops["attention_bwd"]["calls_per_step"] == fused
    assert ops["add_bias_residual"]["calls_per_step"] == 2 * fused
    assert ops["layer_norm_bwd"]["calls_per_step"] == 2 * fused + 1
    assert ops["layer_norm_fwd"]["calls_per_step"] == 1 and "cast_colsum" not in ops
    # bytes in and out: qkv (bf16) and the qkv bias (float32) in; o and the probabilities (bf16) out
    rows = batch * tokens
    qkv, bias, out, probabilities = (
        2 * rows * 3 * width,
        4 * 3 * width,
        2 * rows * width,
        2 * batch * heads * tokens**2,
    )
    assert ops["attention_fwd"]["bytes_per_call"] == qkv + bias + out + probabilities
    fc1 = ops[f"mm [{rows}x{width}]·[{width}x{hidden}]ᵀ"]  # the forward fc1 product: LN output · weightᵀ
    assert fc1["tflops"] * 1e12 * fc1["ms_per_step"] / 1e3 == pytest.approx(fused * 2 * rows * width * hidden)
    shares = result["share_of_step"]
    assert all(op["ms_per_step"] > 0 for op in ops.values()) and 0 < shares["everything else"] < 1
    assert shares["matmul"] + shares["kernel"] + shares["everything else"] == pytest.approx(1)
    assert result["copy_bandwidth_gb_per_second"] > 0
    # the design's floor: the model's FLOPs at the matmuls' mean rate plus the kernels' bytes at copy bandwidth
    ceiling, matmuls = result["ceiling"], [op for op in ops.values() if op["kind"] == "matmul"]
    assert (
        min(op["tflops"] for op in matmuls) <= ceiling["matmul_tflops"] <= max(op["tflops"] for op in matmuls)
    )
    # TFLOP/s x ms = GFLOP; the block's oneDNN products are part of the model's
    timed_gflop = sum(op["tflops"] * op["ms_per_step"] for op in matmuls)
    assert ceiling["model_gflop_per_step"] > timed_gflop
    kernel_bytes = sum(
        op["bytes_per_call"] * op["calls_per_step"] for op in ops.values() if op["kind"] == "kernel"
    )
    assert ceiling["memory_ms"] == pytest.approx(kernel_bytes / result["copy_bandwidth_gb_per_second"] / 1e6)
    assert ceiling["step_ms"] == pytest.approx(ceiling["arithmetic_ms"] + ceiling["memory_ms"])
    assert ceiling["mfu"] / ceiling["measured_mfu"] == pytest.approx(result["step_ms"] / ceiling["step_ms"])
    assert len(step_breakdown.report(result)) == len(ops) + 1  # and "everything else"
    assert fused_cpu._kernels is not None and not isinstance(fused_cpu._kernels, step_breakdown._TimedKernels)


def test_dedup_extrapolation_grows_stage_1_along_the_measured_exponent():
    """Stage 1 takes 1 ms at 10k and 4 ms at 160k test images (exponent 0.5): 300k → 4 sqrt(300/160) ms; the
    rest of the search and a JPEG decode are added once per query; 14M queries over 64 cores."""
    rows = [
        {"references": 10_000, "ivf_ms_per_query": 1.0, "search_ms_per_query": 2.0, "ivf_build_seconds": 1.0},
        {
            "references": 160_000,
            "ivf_ms_per_query": 4.0,
            "search_ms_per_query": 5.0,
            "ivf_build_seconds": 16.0,
        },
    ]
    x = dedup_scale.extrapolate(rows, jpeg_ms=1.5)
    stage1 = 4.0 * (300 / 160) ** 0.5
    assert x["stage1_growth_exponent"] == pytest.approx(0.5)
    assert x["stage1_ms_at_target"] == pytest.approx(stage1)
    assert x["ms_per_query"] == pytest.approx(5.0 - 4.0 + stage1 + 1.5)
    assert x["hours_on_64_cores"] == pytest.approx(14e6 * (5.0 - 4.0 + stage1 + 1.5) / 1e3 / 3600 / 64)
    assert x["build_seconds_at_target"] == pytest.approx(30.0)


def test_gpu_benchmark_runs_every_installed_model_on_the_cpu_at_toy_size():
    """The GPU benchmark's own code path, at a toy shape on the CPU (CI has no GPU): each installed model gives a
    rate, a TFLOP/s and a first-step time, with and without activation checkpointing; timm is optional.
    Compiling takes minutes on CI's two cores: `torch.compile` of the training step is tested in test_training."""
    cpu, configs = torch.device("cpu"), ["eager", "eager+ckpt"]
    result = gpu_throughput.measure("Ti/16", configs, 2, 32, rounds=1, steps=1, device=cpu)
    kinds = {"vit_pipelines", "transformers", "timm"} - set(result["not_installed"])
    assert {"vit_pipelines", "transformers"} <= kinds
    assert set(result["rows"]) == {f"{k} {c}" for k in kinds for c in configs}
    for row in result["rows"].values():
        assert row["images_per_second"] > 0 and row["tflops"] > 0 and row["peak_memory_gib"] is None
    assert gpu_throughput.dense_peak(cpu) is None


@pytest.mark.slow
def test_gpu_benchmark_scaling_section_runs_on_two_cpu_processes_and_fsdp_halves_the_state(tmp_path):
    """`--sharding ddp fsdp` under `accelerate launch` at a toy shape on two gloo ranks: both rows, and each
    sharded process holds half the weights, gradients and Adam moments of a replicated one."""
    out = tmp_path / "scaling.json"
    script = Path(gpu_throughput.__file__)
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    args = [
        "--sharding",
        "ddp",
        "fsdp",
        "--models",
        "Ti/16",
        "--image-size",
        "32",
        "--batch",
        "2",
        "--steps",
        "1",
    ]
    done = subprocess.run(
        [*launch, str(script), *args, "--out", str(out)], capture_output=True, text=True,
        env={**os.environ, "ACCELERATE_USE_CPU": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp, fsdp = json.loads(out.read_text())["results"]
    assert (ddp["sharding"], fsdp["sharding"]) == ("ddp", "fsdp") and ddp["processes"] == 2
    assert ddp["images_per_second"] > 0 and fsdp["images_per_second"] > 0
    assert fsdp["state_gib_per_process"] == pytest.approx(ddp["state_gib_per_process"] / 2, rel=0.02)


def test_activation_memory_benchmark_recomputes_the_same_gradients_keeping_less():
    off, on = (activation_memory.one_step("Ti/16", 2, 32, checkpointing) for checkpointing in (False, True))
    assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-6) and on["loss"] == off["loss"]
    assert on["saved_for_backward_gib"] < 0.3 * off["saved_for_backward_gib"]
