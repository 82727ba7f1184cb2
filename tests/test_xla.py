"""The XLA path (TPUs) on torch_xla's CPU device, `PJRT_DEVICE=CPU`: the README's launch command end to end,
exact resume with dropout and DRLoc on, masked patch prediction, few-shot features and fine-tuning on the XLA
model, and no new graphs after warm-up. `.ci/run` runs this module in its own environment (constraints-tpu.txt);
in the main one torch_xla is not installed and the module is skipped."""

import json
import logging
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import copy_project, newest, run_in
from test_training import assert_same_weights, config, tiny_cache, tiny_model

pytest.importorskip(
    "torch_xla", reason="torch_xla is not installed here: .ci/run runs this module in its own venv"
)
import torch_xla.debug.metrics as metrics  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from vit_pipelines.evaluation.features import extract_features  # noqa: E402
from vit_pipelines.evaluation.finetune import finetune_and_test  # noqa: E402
from vit_pipelines.training import train  # noqa: E402
from vit_pipelines.training.loop import make_accelerator, process_state, seed_everywhere  # noqa: E402
from vit_pipelines.training.objectives import DRLocConfig  # noqa: E402
from vit_pipelines.workers import writer_id  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("PJRT_DEVICE") != "CPU", reason="run with PJRT_DEVICE=CPU (torch_xla's CPU device)"
)

TPU_LAUNCH = (
    "accelerate",
    "launch",
    "--tpu",
    "--main_training_function",
    "main",
    "-m",
    "vit_pipelines.__main__",
)


def test_the_process_trains_on_the_xla_device_in_bf16():
    assert process_state().device.type == "xla"
    assert make_accelerator("auto").mixed_precision == "bf16"  # the device's native type, whatever the host


def test_the_readme_launch_command_runs_the_tiny_pretrain_on_xla(tmp_path):
    project = copy_project(tmp_path / "project")
    result = run_in(project, *TPU_LAUNCH, "--env", "tiny", "--pipelines", "pretrain")
    said = result.stdout + result.stderr
    assert (
        "training pretrain on xla:0" in said
        and "Finished `kedro run --env tiny --pipelines pretrain`" in said
    )
    metrics_file = json.loads(newest(project / "data/tiny/08_reporting/pretrain_metrics.json").read_text())
    assert metrics_file["steps"] == 6 and 0 <= metrics_file["minival_accuracy"] <= 1


def test_a_killed_run_resumes_on_xla_to_the_weights_of_an_uninterrupted_one(tmp_path):
    """Dropout and DRLoc's pair sampling draw from XLA's own generator: seeded per step, they repeat."""
    cache = tiny_cache()
    run = config(steps=6, checkpoint_every=2, drloc=DRLocConfig(pairs=8, weight=0.5, mlp_dim=16))
    straight = train(tiny_model(dropout=0.1), cache, run, checkpoint_dir=tmp_path / "straight")
    killed = train(tiny_model(dropout=0.1), cache, run, checkpoint_dir=tmp_path / "killed", stop_after=3)
    assert killed.resumed_from_step == 0
    resumed = train(tiny_model(seed=9, dropout=0.1), cache, run, checkpoint_dir=tmp_path / "killed")
    assert resumed.resumed_from_step == 2
    assert all(p.device.type == "cpu" for p in resumed.model.parameters())
    assert_same_weights(straight.model, resumed.model, tol=0)
    # and the resumed run's own checkpoints (Adam state included) were written: the newest is the final step's
    finals = [sorted((tmp_path / run_name).glob("*/step_*"))[-1] for run_name in ("straight", "killed")]
    assert [f.name for f in finals] == ["step_0000006", "step_0000006"]


def test_masked_patch_prediction_trains_on_xla_and_comes_back_whole():
    run = config(steps=4, objective="masked_patch", pp_train="value_range(-1,1)")
    result = train(tiny_model(num_classes=512), tiny_cache(), run)
    assert all(p.device.type == "cpu" for p in result.model.parameters())
    assert np.isfinite([r["loss"] for r in result.history if "loss" in r]).all()


def test_fewshot_features_and_fine_tuning_run_on_the_xla_model():
    model, cache = tiny_model(), tiny_cache()
    on_cpu, labels_cpu = extract_features(model, cache, "value_range(-1,1)", batch_size=16)
    device = process_state().device
    on_xla, labels = extract_features(model.to(device), cache, "value_range(-1,1)", batch_size=16)
    assert np.array_equal(labels, labels_cpu)
    np.testing.assert_allclose(on_xla, on_cpu, atol=0.05)  # bf16 on XLA against float32 or bf16 on the host
    run, scores = finetune_and_test(model.to("cpu"), cache, cache, config(steps=4), "value_range(-1,1)", 16)
    assert 0 <= scores["test_accuracy"] <= 1
    assert [r["step"] for r in run.history if "test_accuracy" in r] == [4]  # scored on XLA during training


def test_no_graph_is_compiled_after_warm_up():
    counts = []

    def count_graphs(model, accelerator):  # an evaluator: called at steps 4, 8, 12
        counts.append(metrics.metric_data("CompileTime")[0] if metrics.metric_data("CompileTime") else 0)
        return {}

    run = config(steps=12, eval_every=4, warmup_steps=3)
    train(tiny_model(dropout=0.1), tiny_cache(), run, evaluators={"graphs": count_graphs})
    assert len(counts) == 3 and counts[1] == counts[2], counts  # steps 9-12 reuse the compiled graphs
    assert counts[0] > 0


def test_seeding_reaches_the_xla_generator():
    device = process_state().device
    draws = []
    for _ in range(2):
        seed_everywhere(5, device)
        draws.append(torch.rand(4, device=device).cpu())
    assert torch.equal(draws[0], draws[1])


def test_replicas_as_threads_gather_in_rank_order_write_apart_and_log_from_rank_0(monkeypatch):
    """Two replicas as threads of one process (as TPU v2/v3 run them), the rendezvous simulated: torch_xla 2.9's
    CPU all-reduce aborts with two devices in one process."""
    import torch_xla.core.xla_model as xm

    from vit_pipelines import hooks
    from vit_pipelines.training import loop

    local, barrier, slots = threading.local(), threading.Barrier(2), [None, None]

    def rendezvous(tag, payload):
        slots[local.rank] = payload
        barrier.wait()
        return list(slots)

    def state():
        return SimpleNamespace(
            num_processes=2, distributed_type=DistributedType.XLA, is_main_process=local.rank == 0
        )

    monkeypatch.setattr(xm, "rendezvous", rendezvous)
    monkeypatch.setattr(loop, "process_state", state)
    monkeypatch.setattr(hooks, "process_state", state)
    info = logging.LogRecord("vit_pipelines", logging.INFO, __file__, 1, "a step", None, None)
    warning = logging.LogRecord("vit_pipelines", logging.WARNING, __file__, 1, "a problem", None, None)
    seen = {}

    def replica(rank: int) -> None:
        local.rank = rank
        gathered = loop.gather_lists([rank] * (rank + 1))
        logs = [hooks._main_rank_or_warning(info), hooks._main_rank_or_warning(warning)]
        seen[rank] = (gathered, writer_id(), logs)

    threads = [threading.Thread(target=replica, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert seen[0][0] == seen[1][0] == [0, 1, 1]  # rank 0's list, then rank 1's
    assert seen[0][1] != seen[1][1]  # temporary file names differ between the threads
    assert seen[0][2] == [True, True] and seen[1][2] == [False, True]  # rank 1 keeps its warnings only
