"""The training loop: weight-decay groups, schedules, losses, gradient accumulation and exact resume."""

import io
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from vit_pipelines.data.cache import ShardBuild, open_shards
from vit_pipelines.models import VisionTransformer, ViTConfig
from vit_pipelines.training import TrainConfig, train
from vit_pipelines.training.loop import NonFiniteLossError, data_identity, run_fingerprint
from vit_pipelines.training.losses import classification_loss
from vit_pipelines.training.objectives import Classification
from vit_pipelines.training.optim import build_optimizer, lr_multiplier, param_groups
from vit_pipelines.training.saving import (
    CheckpointWriter,
    latest_training_state,
    load_model,
    load_training_state,
    save_model,
    save_training_state,
)


def tiny_model(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    fields = dict(
        image_size=8, patch_size=4, depth=2, width=32, mlp_dim=64, num_heads=2, representation_size=16,
        num_classes=3,
    )  # fmt: skip
    fields.update(overrides)
    model = VisionTransformer(ViTConfig(**fields))
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a zero head would leave most gradients zero at step 1
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, tol: float = 1e-6) -> None:
    """Every tensor of `a`'s state dict equals `b`'s, in order, within `tol`."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, msg=name)


def tiny_cache(n: int = 48, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 60, (n, 8, 8, 3), dtype=np.uint8)
    images[np.arange(n), :, :, labels] += 150  # the label is the brightest channel: learnable
    features = datasets.Features(image=datasets.Array3D((8, 8, 3), "uint8"), label=datasets.Value("int64"))
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def config(**overrides) -> TrainConfig:
    fields = dict(
        steps=6, batch_size=16, lr=1e-3, warmup_steps=2, weight_decay=0.1, mixed_precision="no", log_every=2,
        pp_train="random_crop(8)|flip_lr|value_range(-1,1)",
    )  # fmt: skip
    fields.update(overrides)
    return TrainConfig(**fields)


def test_weight_decay_skips_biases_norms_posemb_and_cls_token():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {
        "pos_embed",
        "cls_token",
        "norm.weight",
        "norm.bias",
        "head.bias",
        "blocks.0.attn.qkv.bias",
    } <= skipped
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.3.weight", "head.weight",
            "pre_logits.0.weight"} <= decayed  # fmt: skip
    assert not any("norm" in n or n.endswith("bias") or "pos_embed" in n for n in decayed)
    assert len(decayed) + len(skipped) == len(list(model.parameters()))
    learn2d = dict(zip(["decay", "no_decay"], param_groups(tiny_model(posemb="learn2d"), 0.1), strict=True))
    assert all(p.ndim >= 2 for p in learn2d["decay"]["params"])
    assert (
        len(learn2d["no_decay"]["params"]) == len(param_groups(tiny_model(), 0.1)[1]["params"]) + 1
    )  # row+col


def test_adam_decay_shrinks_kernels_by_lr_times_wd_and_leaves_the_rest():
    model = tiny_model()
    optimizer = build_optimizer(model, "adam", lr=1e-2, weight_decay=0.1)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    kernel, bias = model.blocks[0].mlp[0].weight, model.blocks[0].mlp[0].bias
    before = kernel.detach().clone(), bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradients: only the decay moves anything
    optimizer.step()
    torch.testing.assert_close(kernel, before[0] * (1 - 1e-2 * 0.1))
    torch.testing.assert_close(bias, before[1])
    sgd = build_optimizer(tiny_model(), "sgd", lr=0.01, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


def test_fused_adamw_takes_the_same_steps_as_the_per_tensor_one():
    models = tiny_model(), tiny_model()
    optimizers = [
        build_optimizer(m, "adam", lr=1e-2, weight_decay=0.1, fused=f)
        for m, f in zip(models, (0, 1), strict=True)
    ]
    assert optimizers[1].defaults["fused"] and not optimizers[0].defaults["fused"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers, strict=True):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(models[0].blocks[0].mlp[0].weight, tiny_model().blocks[0].mlp[0].weight)


def test_freed_memory_is_reused_without_page_faults():
    """Large blocks freed by one step serve the next without the kernel mapping fresh pages (glibc)."""
    import resource

    from vit_pipelines.training.loop import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc: malloc tuning does not apply")

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def step() -> None:  # allocates and frees 16 MiB ten times
        for _ in range(10):
            torch.ones(4 << 20).sum()

    step()  # the heap grows to the step's needs once
    before = faults()
    step()
    assert faults() - before < 400  # without the tuning: ~2,900 on each of the 10 allocations


@pytest.mark.parametrize(
    ("step", "decay", "expected"),
    [
        (0, "cosine", 0.0),
        (5, "cosine", 0.5),
        (10, "cosine", 1.0),
        (55, "cosine", 0.5),
        (100, "cosine", 0.0),
        (32.5, "cosine", 0.5 * (1 + math.cos(math.pi * 0.25))),
        (55, "linear", 0.5),
        (100, "linear", 0.0),
        (77.5, "linear", 0.25),
        (50, "constant", 1.0),
    ],
)
def test_schedule_values(step, decay, expected):
    assert lr_multiplier(step, total_steps=100, warmup_steps=10, decay=decay) == pytest.approx(expected)


def test_schedule_end_value_and_no_warmup():
    assert lr_multiplier(100, 100, 0, "linear", end=0.1) == pytest.approx(0.1)
    assert lr_multiplier(0, 100, 0, "cosine") == 1.0
    with pytest.raises(ValueError, match="decay"):
        lr_multiplier(0, 10, 0, "step")


def test_losses_softmax_sigmoid_and_label_smoothing():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(classification_loss(logits, labels), F.cross_entropy(logits, labels))
    manual = -(
        F.logsigmoid(logits) * F.one_hot(labels, 3) + F.logsigmoid(-logits) * (1 - F.one_hot(labels, 3))
    )
    torch.testing.assert_close(classification_loss(logits, labels, "sigmoid"), manual.sum(-1).mean())
    smooth = classification_loss(logits, labels, label_smoothing=0.3)
    log_p = logits.log_softmax(-1)
    expected = -(0.7 * log_p.gather(1, labels[:, None]).squeeze(1) + 0.3 * log_p.mean(-1)).mean()
    torch.testing.assert_close(smooth, expected)


def test_training_learns_a_separable_task():
    cache = tiny_cache(96)
    result = train(tiny_model(), cache, config(steps=40, lr=3e-3, log_every=10, warmup_steps=5))
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["accuracy"] > 0.9
    timed = sum(r["seconds"] for r in result.history)  # the logged intervals cover the run, nothing twice
    assert 0.5 * result.wall_seconds < timed <= result.wall_seconds
    assert result.images_per_second == pytest.approx(40 * 16 / timed)


def test_gradient_accumulation_equals_one_big_batch():
    # SGD, so the comparison is of the gradients themselves: Adam divides near-zero gradients (the key bias's
    # are exactly zero in theory) by their own magnitude and would amplify rounding noise.
    cache = tiny_cache()
    sgd = dict(steps=3, batch_size=16, optimizer="sgd", lr=0.1, warmup_steps=0)
    big = train(tiny_model(), cache, config(**sgd))
    accumulated = train(tiny_model(), cache, config(**sgd, micro_batch_size=4))
    assert_same_weights(big.model, accumulated.model, tol=1e-5)
    assert not torch.equal(big.model.head.weight, tiny_model().head.weight)  # training moved the weights


def test_resume_after_a_kill_gives_the_same_weights(tmp_path):
    cache = tiny_cache()
    run = config(steps=8, checkpoint_every=3)
    straight = train(tiny_model(dropout=0.1), cache, run)
    # Killed after 5 steps: the newest checkpoint is step 3, and re-running resumes from it.
    killed = train(tiny_model(dropout=0.1), cache, run, checkpoint_dir=tmp_path, stop_after=5)
    assert killed.resumed_from_step == 0
    assert latest_training_state(next(tmp_path.iterdir())).name == "step_0000003"
    resumed = train(tiny_model(seed=123, dropout=0.1), cache, run, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 3
    assert_same_weights(straight.model, resumed.model)
    assert [r["step"] for r in resumed.history if "loss" in r] == [2, 4, 6, 8]
    # A different configuration does not pick up these checkpoints.
    other = train(
        tiny_model(dropout=0.1), cache, config(steps=8, checkpoint_every=3, lr=2e-3), checkpoint_dir=tmp_path
    )
    assert other.resumed_from_step == 0


def test_a_run_on_other_data_of_the_same_size_starts_anew(tmp_path, caplog):
    cache, run = tiny_cache(), config(steps=4, checkpoint_every=2)
    assert train(tiny_model(), cache, run, checkpoint_dir=tmp_path).resumed_from_step == 0
    relabelled = cache.map(lambda row: {"label": (row["label"] + 1) % 3})  # same count, other labels
    with caplog.at_level("INFO", logger="vit_pipelines.training.loop"):
        again = train(tiny_model(), relabelled, run, checkpoint_dir=tmp_path)
    assert again.resumed_from_step == 0 and len(list(tmp_path.iterdir())) == 2
    assert "the model, a training setting or the data differ" in caplog.text
    assert train(tiny_model(), cache, run, checkpoint_dir=tmp_path).resumed_from_step == 4  # its own run


def test_the_data_identity_of_an_image_cache_is_its_build(tmp_path):
    pngs = []
    for image in tiny_cache(40)["image"]:
        buffer = io.BytesIO()
        PIL.Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    source = datasets.Dataset.from_dict({"image": pngs, "label": tiny_cache(40)["label"]})
    rows = {"seed 0": np.arange(0, 36), "seed 1": np.arange(4, 40), "again": np.arange(0, 36)}
    identities = {}
    for name, picked in rows.items():
        ShardBuild(source, picked, "encoded", shard_bytes=4096).write(tmp_path / name)
        identities[name] = data_identity(open_shards(tmp_path / name))
    assert identities["seed 0"] == identities["again"] != identities["seed 1"]  # same count, other images


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "steps must be a whole number >= 1, got 0"),
        ("steps", -5, "steps must be a whole number >= 1, got -5"),
        ("batch_size", 0, "batch_size must be a whole number >= 1, got 0"),
        ("warmup_steps", 7, r"warmup_steps must be in 0..steps \(6\), got 7"),
        ("lr", 0.0, "lr must be > 0, got 0.0"),
        ("steps", "10", "steps must be a whole number >= 1, got '10'"),
        ("ema_decay", 1.0, r"ema_decay must be null or in \(0, 1\), got 1.0"),
        ("mixed_precision", "fp32", "mixed_precision must be auto or no or bf16 or fp16, got 'fp32'"),
    ],
)
def test_training_parameters_out_of_range_are_refused_in_one_line(field, value, message):
    with pytest.raises(ValueError, match=f"training parameter {message}"):
        config(**{field: value})


def test_an_unquoted_no_for_mixed_precision_means_float32():
    # YAML and `kedro run --params train.mixed_precision=no` read `no` as false
    params = {"steps": 2, "batch_size": 4, "lr": 1e-3, "mixed_precision": False}
    assert TrainConfig.from_params(params).mixed_precision == "no"


def test_checkpoint_keeps_only_the_newest(tmp_path):
    train(
        tiny_model(),
        tiny_cache(),
        config(steps=8, checkpoint_every=2, keep_checkpoints=2),
        checkpoint_dir=tmp_path,
    )
    run_dir = next(tmp_path.iterdir())
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_0000006", "step_0000008"]


def test_model_checkpoint_round_trip_keeps_other_files(tmp_path):
    model = tiny_model(posemb="sincos2d", pool="gap")
    (tmp_path / "checkpoints").mkdir()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config and (tmp_path / "checkpoints").exists()
    images = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.eval()(images), model.eval()(images))


def test_batch_size_must_split_evenly():
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        train(tiny_model(), tiny_cache(), config(batch_size=16, micro_batch_size=5))
    with pytest.raises(ValueError, match="unknown training parameters"):
        TrainConfig.from_params({"steps": 1, "batch_size": 2, "lr": 0.1, "learning_rate": 0.1})


def test_bf16_autocast_training_runs_on_cpu():
    result = train(tiny_model(), tiny_cache(), config(steps=2, mixed_precision="bf16"))
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # master weights stay float32
    assert math.isfinite(result.history[-1]["loss"])


KILLED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from test_training import config, tiny_cache, tiny_model, train
train(tiny_model(dropout=0.1), tiny_cache(), config(steps=400, checkpoint_every=5, keep_checkpoints=50,
      num_workers={workers}), checkpoint_dir={root!r})
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_a_real_sigkill_loses_nothing_but_the_steps_since_the_last_checkpoint(tmp_path, workers):
    """Killed with loader workers or without, resumed with them, it ends with the weights of a straight run
    without workers: a sample's augmentation depends on its stream position alone."""
    tests = str(Path(__file__).parent)
    script = KILLED_RUN.format(tests=tests, root=str(tmp_path), workers=workers)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*/step_0000010")):
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
    proc.wait()
    run_dir = next(tmp_path.iterdir())
    survivor = latest_training_state(run_dir)
    assert survivor is not None and int(survivor.name[5:]) >= 10
    run = config(steps=400, checkpoint_every=5, keep_checkpoints=50)
    with_workers = config(steps=400, checkpoint_every=5, keep_checkpoints=50, num_workers=workers)
    resumed = train(
        tiny_model(seed=9, dropout=0.1), tiny_cache(), with_workers, checkpoint_dir=tmp_path, stop_after=3
    )
    straight = train(tiny_model(dropout=0.1), tiny_cache(), run, stop_after=resumed.resumed_from_step + 3)
    assert resumed.resumed_from_step == int(survivor.name[5:])
    assert_same_weights(straight.model, resumed.model)


def test_ema_follows_the_polyak_recurrence():
    # θ_t after each of 3 SGD steps (runs are deterministic), then ema_t = d·ema_{t-1} + (1-d)·θ_t from θ_0.
    cache, decay = tiny_cache(), 0.7
    run = config(steps=3, optimizer="sgd", lr=0.1, warmup_steps=0, ema_decay=decay)
    thetas = [tiny_model().state_dict()] + [
        train(tiny_model(), cache, run, stop_after=t).model.state_dict() for t in (1, 2, 3)
    ]
    result = train(tiny_model(), cache, run)
    no_ema = train(tiny_model(), cache, config(steps=1, warmup_steps=0)).ema_model
    assert result.ema_model is not None and no_ema is None
    ema = result.ema_model.state_dict()
    for name, theta3 in result.model.state_dict().items():
        expected = thetas[0][name]
        for theta in thetas[1:]:
            expected = decay * expected + (1 - decay) * theta[name]
        torch.testing.assert_close(ema[name], expected, atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(theta3, thetas[3][name])
    assert not torch.equal(ema["head.weight"], result.model.head.weight)


def test_resume_with_ema_gives_the_same_ema_weights(tmp_path):
    cache = tiny_cache()
    run = config(steps=8, checkpoint_every=3, ema_decay=0.9)
    straight = train(tiny_model(dropout=0.1), cache, run)
    train(tiny_model(dropout=0.1), cache, run, checkpoint_dir=tmp_path, stop_after=5)
    assert (latest_training_state(next(tmp_path.iterdir())) / "ema.safetensors").exists()
    resumed = train(tiny_model(seed=123, dropout=0.1), cache, run, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 3
    assert_same_weights(straight.ema_model, resumed.ema_model)


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_no_nan_weights(tmp_path):
    model, calls = tiny_model(), []

    def poison(module, inputs, output):  # NaN logits from the 7th forward pass (step 7) on
        calls.append(1)
        return output * float("nan") if len(calls) >= 7 else output

    model.head.register_forward_hook(poison)
    run = config(steps=30, log_every=5, checkpoint_every=2, keep_checkpoints=100)
    with pytest.raises(
        NonFiniteLossError, match=r"NaN or infinite at step 7; stopped without saving"
    ) as error:
        train(model, tiny_cache(), run, checkpoint_dir=tmp_path)
    saved = sorted(next(tmp_path.iterdir()).glob("step_*"))
    assert [p.name for p in saved] == ["step_0000002", "step_0000004", "step_0000006"]  # step 8 was not saved
    assert str(saved[-1]) in str(error.value)  # the last good checkpoint is named
    for folder in saved:
        assert all(torch.isfinite(w).all() for w in load_model(folder).state_dict().values()), folder.name


def test_labels_outside_the_model_classes_fail_before_training():
    cache = tiny_cache()  # labels 0..2
    with pytest.raises(ValueError, match=r"labels span 0\.\.2 but the model has 2 classes"):
        train(tiny_model(num_classes=2), cache, config())


def test_an_unwritable_or_full_checkpoint_folder_fails_before_training(tmp_path, monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(OSError, match="cannot write checkpoints to .*Point checkpoint_dir at a writable"):
        train(tiny_model(), tiny_cache(), config(checkpoint_every=2), checkpoint_dir=not_a_folder / "ckpt")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))  # 1 kB left
    with pytest.raises(OSError, match=r"MiB free but the checkpoints need about"):
        train(tiny_model(), tiny_cache(), config(checkpoint_every=2), checkpoint_dir=tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").rglob("step_*"))  # nothing trained, nothing written


RANDOM_KILL_RUN = """
import sys
sys.path.insert(0, {tests!r})
from test_training import config, tiny_cache, tiny_model, train
train(tiny_model(dropout=0.1), tiny_cache(), config(steps=60, checkpoint_every=4, keep_checkpoints=2,
      ema_decay=0.9), checkpoint_dir={root!r})
"""


def test_killed_at_a_random_moment_and_rerun_ends_with_the_uninterrupted_weights(tmp_path):
    delay = float(np.random.default_rng().uniform(0.5, 3.0))  # a different moment on every test run
    script = RANDOM_KILL_RUN.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*/step_*")):  # once the run has started
        time.sleep(0.02)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    run = config(steps=60, checkpoint_every=4, keep_checkpoints=2, ema_decay=0.9)
    resumed = train(tiny_model(seed=5, dropout=0.1), tiny_cache(), run, checkpoint_dir=tmp_path)
    straight = train(tiny_model(dropout=0.1), tiny_cache(), run)
    print(f"killed after {delay:.2f} s, resumed from step {resumed.resumed_from_step} of 60")
    for ours, reference in ((resumed.model, straight.model), (resumed.ema_model, straight.ema_model)):
        assert_same_weights(ours, reference)
    assert [r["step"] for r in resumed.history if "loss" in r] == list(range(2, 61, 2))


def test_activation_checkpointing_keeps_the_numbers_and_keeps_far_less_for_backward():
    cache = tiny_cache()
    plain = train(tiny_model(dropout=0.1), cache, config(steps=4))
    recomputed = train(tiny_model(dropout=0.1), cache, config(steps=4, activation_checkpointing=True))
    assert_same_weights(plain.model, recomputed.model)  # dropout replayed in the recomputation
    assert not recomputed.model.activation_checkpointing  # the training run's setting, not the model's

    def saved_for_backward(checkpointing: bool) -> int:
        model = tiny_model(depth=6).train()
        model.activation_checkpointing = checkpointing
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            model(torch.randn(16, 3, 8, 8)).sum()
        return sum(saved)

    assert saved_for_backward(True) < 0.3 * saved_for_backward(False)
    # how a run executes is not what it trains: both settings resume the same checkpoints
    how = config(activation_checkpointing=True, compile=True)
    assert run_fingerprint(tiny_model(), how, 48) == run_fingerprint(tiny_model(), config(), 48)


def test_a_compiled_training_step_trains_the_eager_weights():
    cache = tiny_cache()
    eager = train(tiny_model(), cache, config(steps=4))
    compiled = train(tiny_model(), cache, config(steps=4, compile=True))
    assert_same_weights(eager.model, compiled.model, tol=1e-4)


def test_pjrt_device_without_an_xla_device_stops_naming_the_reason(monkeypatch):
    """A TPU user whose torch_xla is missing (or built for another torch) gets the reason, not a CPU run."""
    from vit_pipelines.training.loop import check_device_asked_for

    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    check_device_asked_for(torch.device("cpu"))  # nothing asked: nothing to say
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # as where it is not installed
    with pytest.raises(RuntimeError, match=r"PJRT_DEVICE=TPU asks for an XLA device, but torch_xla cannot be "
                       r"imported \(ModuleNotFoundError: .*\); install the matching pair: pip install -c constraints-tpu"):  # fmt: skip
        check_device_asked_for(torch.device("cpu"))


def test_a_background_checkpoint_holds_the_weights_of_its_step_and_reports_its_errors(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    at_step = {k: v.clone() for k, v in model.state_dict().items()}
    writer = CheckpointWriter()
    folder = save_training_state(tmp_path / "run", 1, model, optimizer, {"history": []}, writer=writer)
    with torch.no_grad():  # training goes on while the files are written
        for p in model.parameters():
            p.add_(1.0)
    writer.wait()
    restored = tiny_model(seed=5)
    objective = Classification(restored)
    load_training_state(folder, objective, torch.optim.AdamW(objective.parameters(), lr=1e-3))
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, at_step[name], rtol=0, atol=0, msg=name)
    (tmp_path / "blocked").write_text("a file where the run's folder should be")
    save_training_state(tmp_path / "blocked", 2, model, optimizer, {}, writer=writer)
    with pytest.raises(OSError):
        writer.wait()  # the write's error reaches the training thread
    writer.wait()  # and only once


def test_a_loader_that_ends_early_stops_the_run_naming_the_step(monkeypatch):
    import vit_pipelines.training.loop as loop

    full = loop.train_loader
    monkeypatch.setattr(
        loop, "train_loader", lambda cache, pp, batch, n, **kw: full(cache, pp, batch, n - 2, **kw)
    )
    with pytest.raises(RuntimeError, match=r"the training data ended early, at step 5 of 6"):
        train(tiny_model(), tiny_cache(), config())
