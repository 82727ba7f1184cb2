"""One plain training function over `accelerate.Accelerator`, shared by pretraining and fine-tuning.

The global batch is `micro_batch_size x accumulation x processes`; the learning rate is set from the step
each update (stateless, so a resume is exact); dropout is re-seeded from the step; metrics stay on the device
and reach the host only every `log_every` steps, so the loop has no per-step host sync (XLA-friendly).
With `ema_decay`, float32 Polyak / EMA copies of the weights follow every update (paper: 0.9999 for the headline
fine-tuned results) and are checkpointed with the rest.

A checkpoint needs no RNG or data-loader state: augmentation is seeded by the position in the seeded example
stream and dropout by the step, so (weights, optimiser, EMA, step) resume a run exactly. A non-finite loss is
noticed at the next log or checkpoint step (still no per-step sync) and stops the run before anything is saved.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, DistributedType, gather_object, parse_flag_from_env
from tqdm.auto import tqdm

from vit_pipelines.data.cache import MANIFEST, read_manifest
from vit_pipelines.data.loader import resolve_num_workers, train_loader
from vit_pipelines.fields import check_known_fields
from vit_pipelines.models.build import Classifier, build_classifier
from vit_pipelines.models.vit import VisionTransformer
from vit_pipelines.training.losses import SIGMOID_HEAD_BIAS
from vit_pipelines.training.objectives import (
    Classification,
    DRLocConfig,
    MaskedPatchPrediction,
    build_objective,
)
from vit_pipelines.training.optim import build_optimizer, lr_multiplier
from vit_pipelines.training.saving import (
    CheckpointWriter,
    latest_training_state,
    load_sharded_training_state,
    load_training_state,
    objective_state,
    save_sharded_training_state,
    save_training_state,
    writable_folder,
)
from vit_pipelines.training.sharding import (
    SHARDINGS,
    check_sharding,
    consolidated_model,
    full,
    gradient_sync_off,
    has_shards,
    local,
    shard,
)

log = logging.getLogger(__name__)
Evaluator = Callable[[VisionTransformer, Accelerator], dict[str, float]]


PRECISIONS = ("auto", "no", "bf16", "fp16")  # "auto": decided from the training device


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run. `batch_size` is GLOBAL (all processes, all accumulation steps)."""

    steps: int
    batch_size: int
    lr: float
    micro_batch_size: int | None = None  # per process; None = batch_size / processes (no accumulation)
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.0  # decoupled, AdamW units = the paper's number (see build_optimizer)
    warmup_steps: int = 0
    decay: str = "cosine"
    end_lr_fraction: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float | None = None  # Polyak: ema = decay * ema + (1 - decay) * weights, after every step
    loss: str = "softmax"
    label_smoothing: float = 0.0
    objective: str = "classification"  # or "masked_patch" (self-supervised, App. B.1.2)
    drloc: DRLocConfig | None = None  # the auxiliary DRLoc loss of classification (seed 002)
    pp_train: str = "value_range(-1,1)"
    mixed_precision: str = "auto"  # "auto" = bf16 where the hardware runs it fast, else "no"
    log_every: int = 50
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int | str = 0  # loader worker processes per rank; "auto" sizes them from the cores
    activation_checkpointing: bool = False  # recompute each block in the backward pass: larger models/batches
    compile: bool = False  # torch.compile the training step (CUDA: faster after the first steps' compile)
    sharding: str = "ddp"  # ddp: a full copy per rank; fsdp: weights, gradients, Adam, EMA split over ranks

    def __post_init__(self) -> None:
        """Ranges, checked before any work: a bad value is one line, not a random-init model or a crash later."""
        optional = lambda check: lambda v: v is None or check(v)  # noqa: E731
        rules = {
            "steps": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
            "batch_size": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
            "micro_batch_size": (
                optional(lambda v: isinstance(v, int) and v >= 1),
                "null or a whole number >= 1",
            ),
            "lr": (lambda v: v > 0, "> 0"),
            "warmup_steps": (
                lambda v: isinstance(v, int) and 0 <= v <= self.steps,
                f"in 0..steps ({self.steps})",
            ),
            "weight_decay": (lambda v: v >= 0, ">= 0"),
            "grad_clip": (optional(lambda v: v > 0), "null or > 0"),
            "ema_decay": (optional(lambda v: 0 < v < 1), "null or in (0, 1)"),
            "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "end_lr_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
            "log_every": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
            "eval_every": (
                lambda v: isinstance(v, int) and v >= 0,
                "a whole number >= 0 (0: at the end only)",
            ),
            "checkpoint_every": (lambda v: isinstance(v, int) and v >= 0, "a whole number >= 0 (0: none)"),
            "keep_checkpoints": (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
            "sharding": (lambda v: v in SHARDINGS, " or ".join(SHARDINGS)),
            "mixed_precision": (lambda v: v in PRECISIONS, " or ".join(PRECISIONS)),
        }
        for name, (check, wanted) in rules.items():
            value = getattr(self, name)
            try:
                ok = not isinstance(value, bool) and check(value)
            except TypeError:  # a string or a list where a number belongs
                ok = False
            if not ok:
                raise ValueError(f"training parameter {name} must be {wanted}, got {value!r}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainConfig:
        check_known_fields(cls, params, "training parameters")
        values = dict(params)
        if values.get("mixed_precision") is False:  # YAML reads an unquoted `no` as false
            values["mixed_precision"] = "no"
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        if isinstance(values.get("drloc"), dict):
            check_known_fields(DRLocConfig, values["drloc"], "drloc parameters")
            values["drloc"] = DRLocConfig(**values["drloc"])
        return cls(**values)

    def build_model(self, model_params: dict[str, Any], classes: int) -> Classifier:
        """`build_classifier(model_params, classes, self.seed)`, its head bias set for these settings' `loss`."""
        overrides = dict(model_params)
        if self.loss == "sigmoid":
            overrides.setdefault("head_bias_init", SIGMOID_HEAD_BIAS)
        return build_classifier(overrides, classes, self.seed)

    def build_objective(self, model: VisionTransformer) -> Classification | MaskedPatchPrediction:
        """The objective these settings name (`objective`, `loss`, `label_smoothing`, `drloc`), wrapping `model`."""
        return build_objective(model, self.objective, self.loss, self.label_smoothing, self.drloc)

    def build_optimizer(self, objective: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
        """The optimiser these settings name over `objective`'s parameters; AdamW runs its fused kernel where the
        parameters will train on CPU or CUDA (not XLA: they move there after this, and it has no such kernel)."""
        fused = device.type in ("cpu", "cuda")
        return build_optimizer(
            objective, self.optimizer, self.lr, self.weight_decay, self.betas, self.momentum, fused
        )


@dataclass
class TrainResult:
    model: VisionTransformer
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0  # where this session started
    wall_seconds: float = 0.0  # the run's, over all its sessions
    images_per_second: float = 0.0
    ema_model: VisionTransformer | None = None  # the EMA weights (buffers from `model`) when ema_decay is set


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """`requested`, or for "auto" the training device's fast precision: bf16 on XLA (TPUs' native type) and
    on CUDA where supported (else fp16), bf16 on a CPU with AVX512-BF16 or AMX, else float32 ("no")."""
    if requested != "auto":
        return requested
    if device.type == "xla":
        return "bf16"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # AVX512-BF16 / AMX make bf16 matmuls several times faster than float32 on CPU.
    return "bf16" if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else "no"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    A CPU training step allocates and frees hundreds of megabytes of activations. By default glibc serves blocks
    above its (adaptive) mmap threshold with fresh mappings and trims the heap top, so every step page-faults all
    of it in again: ~80,000 faults and 10-15% of a ViT-Ti/4 step on this project's CPU machine. Blocks up to
    32 MiB (glibc's ceiling) now come from the heap, which keeps up to 1 GiB free at its top; the resident size
    stays at the run's peak instead of breathing. Returns whether the settings applied (glibc only)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_threshold, 32 << 20))


def process_state() -> PartialState:
    """Accelerate's per-process state: the process group under `accelerate launch`. `ACCELERATE_USE_CPU` is
    honoured as `Accelerator` honours it; a bare `PartialState()` would not, and, being shared, would leave a
    CPU launch without its gloo ranks."""
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes > 1:
        _leave_process_group_at_exit()
    return state


@functools.cache
def _leave_process_group_at_exit() -> None:
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    """At exit, before C++ teardown: a gloo process group left standing aborts some exits with `terminate
    called without an active exception` (SIGABRT) after all work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def gather_lists(items: list) -> list:
    """Every rank's `items` concatenated in rank order (collective), on every rank: Accelerate's `gather_object`,
    which XLA lacks; there the lists travel pickled through a rendezvous."""
    state = process_state()
    if state.num_processes == 1:
        return list(items)
    if state.distributed_type == DistributedType.XLA:
        import torch_xla.core.xla_model as xm

        payloads = xm.rendezvous("vit_pipelines.gather_lists", pickle.dumps(items))
        return [item for payload in payloads for item in pickle.loads(payload)]
    return gather_object(items)


def rank_share(rows: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of `rows` rows among `world` ranks: at most ceil(rows / world) of them."""
    return range(rank * rows // world, (rank + 1) * rows // world)


def shares_per_rank(rows: int) -> list[int]:
    """How many of `rows` rows each rank of this launch takes (`rank_share`), for reports."""
    world = process_state().num_processes
    return [len(rank_share(rows, r, world)) for r in range(world)]


def seed_everywhere(seed: int, device: torch.device) -> None:
    """Seed the host generator and, on XLA, the device's own, which `torch.manual_seed` does not reach."""
    torch.manual_seed(seed)
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(seed, device=device)


def check_device_asked_for(device: torch.device) -> None:
    """`PJRT_DEVICE` set (by the user or `accelerate launch --tpu`) asks for XLA: if Accelerate is not on an XLA
    device, stop with the reason (torch_xla missing or not importable, or turned off) instead of training on the
    host CPU."""
    asked = os.environ.get("PJRT_DEVICE")
    if not asked or device.type == "xla":
        return
    try:
        import torch_xla  # noqa: F401
    except Exception as err:  # an ImportError, or an OSError for a torch_xla built against another torch
        why = f"torch_xla cannot be imported ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        raise RuntimeError(
            f"PJRT_DEVICE={asked} asks for an XLA device, but {why}; install the matching pair: "
            "pip install -c constraints-tpu.txt -e '.[tpu]'"
        ) from err
    if not parse_flag_from_env("USE_TORCH_XLA", True) or parse_flag_from_env("ACCELERATE_USE_CPU"):
        return  # turned off on purpose
    raise RuntimeError(f"PJRT_DEVICE={asked} asks for an XLA device, but Accelerate chose {device}")


def make_accelerator(mixed_precision: str = "auto") -> Accelerator:
    """An Accelerator that splits each global batch across processes. Accelerate keeps one state per
    process; a run asking for another precision than the last one resets it (the process group stays)."""
    device = process_state().device
    check_device_asked_for(device)
    precision = resolve_mixed_precision(mixed_precision, device)
    keep_freed_memory()  # training's allocation pattern; harmless for the device's own allocator
    if device.type == "cuda":  # float32 matmuls on tensor cores (TF32), as timm's and big_vision's GPU runs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, precision):
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True),
    )


def data_identity(cache: datasets.Dataset) -> str:
    """What a run trains on: the image cache's build key (its source, rows, storage and pp), or the Dataset's
    content fingerprint where it is held in memory. Relabelled images or another split make another run."""
    if cache.cache_files and (Path(cache.cache_files[0]["filename"]).parent / MANIFEST).exists():
        return read_manifest(cache)["key"]
    return cache._fingerprint


def run_fingerprint(
    model: VisionTransformer, config: TrainConfig, num_examples: int, extra: Any = None
) -> str:
    """Identifies "the same configuration" for resuming: model shape, training settings, data (`extra`)."""
    # how a run executes, not what it trains
    how = ("log_every", "num_workers", "activation_checkpointing", "compile", "sharding")
    keep = {k: v for k, v in dataclasses.asdict(config).items() if k not in how}
    # runs that do not use a later field keep the fingerprint they had before it existed
    for name, default in (("ema_decay", None), ("objective", "classification"), ("drloc", None)):
        if keep[name] == default:
            del keep[name]
    blob = json.dumps([model.config.to_dict(), keep, num_examples, extra], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def train(
    model: VisionTransformer,
    train_cache: datasets.Dataset,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    evaluators: dict[str, Evaluator] | None = None,
    accelerator: Accelerator | None = None,
    stop_after: int | None = None,
    description: str = "train",
    objective: Classification | MaskedPatchPrediction | None = None,
) -> TrainResult:
    """Train `model` on `train_cache` for `config.steps` optimiser steps and return it (unwrapped, on CPU).

    With `checkpoint_dir`, a checkpoint is written every `checkpoint_every` steps under
    `checkpoint_dir/<fingerprint>/` and the run resumes from the newest one of the same configuration.
    `evaluators` run every `eval_every` steps and at the end; their numbers join the history.
    `stop_after` ends the run early after that many steps (as a crash would), for tests and time limits.
    `objective` (wrapping `model`) is built from `config.objective` / `config.drloc` when not given.
    """
    accelerator = accelerator or make_accelerator(config.mixed_precision)
    world = accelerator.num_processes
    check_sharding(config.sharding, world, accelerator.device, accelerator.mixed_precision)
    sharded = config.sharding == "fsdp" and world > 1  # one process has nothing to split
    micro = config.micro_batch_size or config.batch_size // world
    if micro < 1 or config.batch_size % (micro * world):
        raise ValueError(
            f"batch_size {config.batch_size} must be a multiple of micro_batch_size {micro} x {world} processes"
        )
    accumulation = config.batch_size // (micro * world)
    if objective is None:
        objective = config.build_objective(model)
    if objective.model is not model:
        raise ValueError("the objective must wrap the model being trained")
    if isinstance(objective, Classification):
        check_labels(train_cache, model.config.num_classes)
    seed_everywhere(config.seed, accelerator.device)
    if sharded:  # before the optimiser is built: it keeps the sharded parameters
        shard(objective, accelerator.device)
    optimizer = config.build_optimizer(objective, accelerator.device)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    ema = None  # starts at the initial weights; a resume overwrites it with the checkpoint's
    if config.ema_decay is not None:
        ema = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    run_dir, latest, start, history, saved = None, None, 0, [], {}
    if checkpoint_dir is not None:
        run_dir = Path(checkpoint_dir) / run_fingerprint(
            model, config, len(train_cache), data_identity(train_cache)
        )
        if accelerator.is_main_process and config.checkpoint_every:
            needed = checkpoint_bytes(objective, optimizer, ema) * (config.keep_checkpoints + 1)
            check_checkpoint_folder(run_dir, needed)
        latest = latest_training_state(run_dir)
        if latest is None and (
            others := sorted(p.name for p in Path(checkpoint_dir).glob("*") if p.is_dir() and p != run_dir)
        ):
            why = "the model, a training setting or the data differ"
            log.info("a new run %s beside %s: %s", run_dir.name, ", ".join(others), why)

    if sharded:  # Accelerate would wrap the sharded model in DDP; autocast is added below instead
        prepared, optimizer = objective, accelerator.prepare(optimizer)
    else:
        prepared, optimizer = accelerator.prepare(objective, optimizer)
    model = accelerator.unwrap_model(prepared).model  # on the device; evaluators and checkpoints use it
    model.activation_checkpointing = config.activation_checkpointing
    forward = torch.compile(prepared) if config.compile else prepared
    autocast = accelerator.autocast if sharded else contextlib.nullcontext  # `prepare` adds it to the rest
    log.info(
        "training %s on %s (mixed precision: %s)",
        description,
        accelerator.device,
        accelerator.mixed_precision,
    )
    if latest is not None:  # after `prepare`: on XLA it replaces the parameters
        whole = accelerator.unwrap_model(prepared)
        load = load_sharded_training_state if has_shards(latest) else load_training_state
        saved = load(latest, whole, optimizer, ema)  # either kind, sharded or not
        start, history = saved["step"], saved.get("history", [])
        log.info("resuming from %s (step %d of %d)", latest, start, config.steps)
    loader = train_loader(
        train_cache,
        config.pp_train,
        micro * world,
        (config.steps - start) * accumulation,
        seed=config.seed,
        start_batch=start * accumulation,
        num_workers=resolve_num_workers(config.num_workers, accelerator.device, world),
    )
    finish = loader.dataset.on_device  # value_range on the device, after the uint8 copy
    batches = iter(accelerator.prepare_data_loader(loader))
    params = [p for p in prepared.parameters() if p.requires_grad]
    if ema is not None:
        ema = {name: value.to(accelerator.device) for name, value in ema.items()}
        ema_targets = [local(value) for value in ema.values()]  # this rank's shard under fsdp
        ema_sources = [local(p.detach()) for p in model.parameters()]  # views: they see the updates

    def evaluate(step: int) -> dict[str, float]:
        results = {"step": step}
        for name, evaluator in (evaluators or {}).items():
            results.update(
                {f"{name}_{k}" if k != name else k: v for k, v in evaluator(model, accelerator).items()}
            )
        return results

    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    bar = tqdm(total=config.steps, initial=start, desc=description, disable=not accelerator.is_main_process)
    terms = objective.terms  # loss terms logged beside the total
    sums = torch.zeros(3 + len(terms), device=accelerator.device)  # since the last log: loss, correct, count,
    # terms, each summed over what the objective counts (images or corrupted patches)
    first_bad = torch.full((), -1, dtype=torch.long, device=accelerator.device)  # first non-finite loss step
    writer = CheckpointWriter()  # checkpoints are written while the next steps run
    t_start = t_log = time.perf_counter()

    def run_seconds() -> float:  # every session of the run, this one up to now
        return saved.get("wall_seconds", 0.0) + time.perf_counter() - t_start

    # the run's time as its final checkpoint records it; a finished run asked again reports that, not a no-op's
    finished_at = saved.get("wall_seconds") if start == config.steps else None
    images_since_log, data_wait = 0, 0.0  # seconds spent waiting for batches since the last log
    prepared.train()
    for step in range(start, end):
        multiplier = lr_multiplier(
            step, config.steps, config.warmup_steps, config.decay, config.end_lr_fraction
        )
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * multiplier
        seed_everywhere(config.seed * 1_000_003 + step, accelerator.device)  # dropout etc.: the step's only
        for micro_step in range(accumulation):
            t_wait = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:  # an XLA loader thread stops its queue on any error in the loader
                raise RuntimeError(
                    f"the training data ended early, at step {step + 1} of {config.steps}: the loader yielded "
                    "fewer batches than the schedule needs (any loader error is printed above)"
                ) from None
            data_wait += time.perf_counter() - t_wait
            last = micro_step == accumulation - 1
            if last:
                no_sync = contextlib.nullcontext()
            else:
                no_sync = gradient_sync_off(prepared) if sharded else accelerator.no_sync(prepared)
            with no_sync, autocast():
                out = forward(finish(batch["images"]), batch["labels"])
                accelerator.backward(out.loss / accumulation)
            loss = out.loss.detach()
            bad = ~torch.isfinite(loss) & (first_bad < 0)
            first_bad = torch.where(bad, step + 1, first_bad)  # on the device: no host sync
            n = out.count.sum().float()
            sums += torch.stack([loss * n, out.correct.sum().float(), n, *(out.terms[t] * n for t in terms)])
        if config.grad_clip:
            accelerator.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:  # a Python-float weight: no host sync
            torch._foreach_lerp_(ema_targets, ema_sources, 1.0 - config.ema_decay)
        images_since_log += config.batch_size
        done = step + 1
        is_last = done == config.steps
        bar.update(1)

        saving = (
            run_dir is not None
            and config.checkpoint_every
            and (done % config.checkpoint_every == 0 or is_last)
        )
        logging_now = done % config.log_every == 0 or is_last or done == end
        if logging_now or saving:
            try:
                stop_if_not_finite(accelerator, first_bad, run_dir)
            except NonFiniteLossError:
                bar.close()  # leave the terminal clean above the error
                raise
        if logging_now:
            loss_sum, correct, seen, *term_sums = accelerator.reduce(sums, reduction="sum").tolist()
            seconds = time.perf_counter() - t_log
            record = {
                "step": done,
                "loss": loss_sum / seen,
                "accuracy": correct / seen,
                **{t: value / seen for t, value in zip(terms, term_sums, strict=True)},
                "lr": config.lr * multiplier,
                "images_per_second": images_since_log / seconds,
                "data_wait_fraction": data_wait / seconds,
                "images": images_since_log,
                "seconds": seconds,
            }
            sums.zero_()
            t_log, images_since_log, data_wait = time.perf_counter(), 0, 0.0
            history.append(record)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                acc=f"{record['accuracy']:.3f}",
                lr=f"{record['lr']:.2e}",
                img_s=f"{record['images_per_second']:.0f}",
            )
        t_pause = time.perf_counter()  # evaluation and checkpoint time do not count against throughput
        if evaluators and (is_last or (config.eval_every and done % config.eval_every == 0)):
            history.append(evaluate(done))
            prepared.train()
            if accelerator.is_main_process:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k != "step")
                bar.write(f"{description} step {done}: {shown}")
        if saving:
            accelerator.wait_for_everyone()
            state = {
                "fingerprint": run_dir.name,
                "config": dataclasses.asdict(config),
                "history": history,
                "wall_seconds": run_seconds(),
            }
            finished_at = state["wall_seconds"] if is_last else None
            if sharded:  # every rank writes its shards
                save_sharded_training_state(
                    run_dir, done, prepared, optimizer, state, config.keep_checkpoints, ema
                )
            elif accelerator.is_main_process:
                save_training_state(
                    run_dir,
                    done,
                    model,
                    optimizer,
                    state,
                    config.keep_checkpoints,
                    ema=ema,
                    objective=objective_state(objective),
                    writer=writer,
                )
        t_log += time.perf_counter() - t_pause
    bar.close()
    writer.wait()  # the last checkpoint is on disk before the run reports
    wall = run_seconds() if finished_at is None else finished_at
    model.activation_checkpointing = False
    if sharded:  # every rank gets the whole model, as after unsharded training
        unwrapped = consolidated_model(prepared).eval()
    else:
        # the model and the objective's own weights ([mask], DRLoc)
        accelerator.unwrap_model(prepared).to("cpu")
        unwrapped = model.eval()
    ema_model = None
    if ema is not None:
        ema_model = copy.deepcopy(unwrapped)
        averaged = {name: full(value) for name, value in ema.items()}
        # buffers as trained, weights averaged
        ema_model.load_state_dict({**unwrapped.state_dict(), **averaged})
    logs = [r for r in history if "seconds" in r]  # every session of a resumed run
    throughput = sum(r["images"] for r in logs) / max(sum(r["seconds"] for r in logs), 1e-9)
    return TrainResult(
        unwrapped,
        history,
        resumed_from_step=start,
        wall_seconds=wall,
        images_per_second=throughput,
        ema_model=ema_model,
    )


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; nothing after the last good checkpoint was saved."""


def stop_if_not_finite(accelerator: Accelerator, first_bad: torch.Tensor, run_dir: Path | None) -> None:
    """Raise `NonFiniteLossError` naming the first bad step (any rank's) and the checkpoint to go back to."""
    bad_steps = accelerator.gather(first_bad.reshape(1))
    if (bad_steps < 0).all():
        return
    step = int(bad_steps[bad_steps >= 0].min())
    latest = latest_training_state(run_dir) if run_dir is not None else None
    kept = f"the last good checkpoint, {latest}, is kept" if latest else "no checkpoint had been written yet"
    raise NonFiniteLossError(
        f"the training loss became NaN or infinite at step {step}; stopped without saving; {kept}. "
        "Lower the learning rate, enable grad_clip or warmup, or use mixed_precision 'no' / 'bf16' "
        "instead of 'fp16'."
    )


def check_labels(cache: datasets.Dataset, num_classes: int) -> None:
    """Every label must be a class index of the model: a clear error before any training."""
    if "label" not in cache.column_names:
        raise ValueError(f"the training data has no 'label' column; its columns are {cache.column_names}")
    labels = cache.select_columns(["label"]).with_format("numpy")[:]["label"]  # not the images
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels span {low}..{high} but the model has {num_classes} classes (0..{num_classes - 1}): "
            "fix the label column or the model's num_classes"
        )


def checkpoint_bytes(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None
) -> int:
    """Size of one checkpoint: weights, optimiser state (estimated as 2 float32 copies for Adam, 1 for SGD
    momentum) and EMA weights."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    copies = 2 if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) else 1
    floats = sum(p.numel() for p in model.parameters()) * 4
    return weights + copies * floats + (floats if ema is not None else 0)


def check_checkpoint_folder(folder: Path, needed_bytes: int) -> None:
    """Fail before training when checkpoints could not be written: `folder` cannot be created or written,
    or its disk has less free space than `needed_bytes`."""
    try:
        existing = writable_folder(folder)
    except OSError as err:
        raise OSError(
            f"cannot write checkpoints to {folder}: {err.strerror or err}. "
            "Point checkpoint_dir at a writable folder (conf/local/parameters_*.yml)."
        ) from err
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise OSError(
            f"{folder} has {free / 2**20:.0f} MiB free but the checkpoints need about "
            f"{needed_bytes / 2**20:.0f} MiB: free some space, lower keep_checkpoints or move checkpoint_dir"
        )


def steps_for_epochs(epochs: float, num_examples: int, batch_size: int) -> int:
    """Optimiser steps that cover `epochs` passes over `num_examples` at global `batch_size`."""
    return max(1, math.ceil(epochs * num_examples / batch_size))
