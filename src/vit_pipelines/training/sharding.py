"""Fully sharded data parallel training (FSDP2, `torch.distributed.fsdp.fully_shard`), `train.sharding: fsdp`.

Every rank keeps 1/N of the weights, gradients, Adam moments and EMA; a unit's full weights exist only while it
runs. The units: each encoder block, each of the model's other layers, the model (its [class] token and
position embedding, gathered by `encode`) and the objective (its own weights). Evaluation calls the sharded
model as training does, every rank with the same number of forward passes (`idle_forwards`).

Checkpoints are torch.distributed.checkpoint folders: every rank writes its shard, and any number of ranks, or
one process without sharding, loads them. `consolidate` turns one into a plain `model.safetensors`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from vit_pipelines.models.checkpoints import write_native
from vit_pipelines.models.config import ViTConfig
from vit_pipelines.models.vit import VisionTransformer

SHARDINGS = ("none", "ddp", "fsdp")
SHARDED = "sharded"  # the torch.distributed.checkpoint folder inside a `step_*` checkpoint
CONFIG = "model_config.json"  # the model's `ViTConfig`, beside the shards, for `consolidate`


def check_sharding(sharding: str, world: int, device: torch.device, precision: str) -> None:
    """One-line refusals of a sharding this launch cannot run."""
    if sharding not in SHARDINGS:
        raise ValueError(f"train.sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    if sharding == "none" and world > 1:
        raise ValueError(
            f"train.sharding is none but {world} processes were launched: use ddp (a full copy per rank) or fsdp"
        )
    if sharding == "fsdp" and device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"train.sharding fsdp runs on CUDA GPUs or CPU processes, not {device.type}: use ddp"
        )
    if sharding == "fsdp" and precision == "fp16":
        raise ValueError("train.sharding fsdp trains in bf16 or float32, not fp16: set mixed_precision bf16")


def shard(objective: nn.Module, device: torch.device) -> None:
    """Shard `objective` (wrapping a `VisionTransformer` as `.model`) in place across all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    model = objective.model
    layers = [*model.blocks, model.patch_embed, model.pos_embed_2d, model.norm, model.pre_logits, model.head]
    for layer in layers:
        if layer is not None and any(True for _ in layer.parameters(recurse=True)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "forward_features")
    register_fsdp_forward_method(model, "encode")  # the objectives call it on their own patch embeddings
    fully_shard(objective, mesh=mesh)
    # The layers' outputs are views (a flattened patch grid, the [class] token); nothing writes to them in place,
    # which is what this warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync_off(module: FSDPModule) -> Iterator[None]:
    """Gradients accumulate unreduced on every rank (the micro-batches before the last of a step)."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a view: updates of either show in the other), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the host (a collective for a sharded one)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def consolidated_model(objective: nn.Module) -> VisionTransformer:
    """A plain (unsharded) copy of `objective.model` on the host, its weights gathered from every rank."""
    weights = get_model_state_dict(objective.model, options=StateDictOptions(full_state_dict=True))
    model = VisionTransformer(objective.model.config)
    model.load_state_dict({name: full(value) for name, value in weights.items()})
    return model


def idle_forwards(shares: list[int], batch_size: int, rank: int) -> int:
    """Forward passes rank `rank` runs on a placeholder batch, so that the ranks of a sharded model (whose every
    forward pass gathers weights from all of them) run as many as the one with the largest share of rows."""
    batches = [-(-rows // batch_size) for rows in shares]
    return max(batches) - batches[rank]


def placeholder_images(model: VisionTransformer, device: torch.device) -> torch.Tensor:
    """One blank image of the model's size, for `idle_forwards`."""
    return torch.zeros(1, model.config.in_chans, *model.config.image_size, device=device)


def save_sharded(
    folder: Path,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Mapping[str, torch.Tensor] | None,
) -> None:
    """Every rank writes its shards of the weights, optimiser state and EMA to `folder/sharded/`
    (collective), and the model's config beside them."""
    dcp.save(_training_state(objective, optimizer, ema), checkpoint_id=folder / SHARDED)
    if torch.distributed.get_rank() == 0:
        (folder / SHARDED / CONFIG).write_text(objective.model.config.to_json())


def load_sharded(
    folder: Path,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Mapping[str, torch.Tensor] | None,
) -> None:
    """Restore what `save_sharded` wrote into `objective`, `optimizer` and, in place, `ema`, whatever the number
    of ranks that wrote it and whether `objective` is sharded now (collective under a launch)."""
    state = _training_state(objective, optimizer, ema)
    _read_shards(state, folder / SHARDED)
    set_state_dict(
        objective, _unwrapped(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def _training_state(
    objective: nn.Module, optimizer: torch.optim.Optimizer, ema: Mapping[str, torch.Tensor] | None
) -> dict[str, Any]:
    """What a sharded checkpoint holds, as torch.distributed.checkpoint saves and fills it: the objective's and
    the optimiser's state dicts keyed by parameter name (this rank's shards where sharded), and the EMA."""
    weights, moments = get_state_dict(objective, _unwrapped(optimizer))
    return {"model": weights, "optimizer": moments, **({"ema": dict(ema)} if ema is not None else {})}


def load_whole(
    objective: FSDPModule,
    optimizer: torch.optim.Optimizer,
    weights: Mapping[str, torch.Tensor],
    moments: dict[str, Any],
    ema: Mapping[str, torch.Tensor] | None = None,
    whole_ema: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Load an unsharded checkpoint into a sharded run: `weights` (the objective's state dict), `moments`
    (the optimiser's `state_dict()`, keyed by position) and `whole_ema` into this rank's shards of `ema`."""
    raw = _unwrapped(optimizer)
    names = {id(p): name for name, p in objective.named_parameters()}
    order = [names[id(p)] for group in raw.param_groups for p in group["params"]]
    by_name = {
        "state": {order[i]: value for i, value in moments["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in moments["param_groups"]],
    }
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(objective, raw, model_state_dict=dict(weights), optim_state_dict=by_name, options=options)
    with torch.no_grad():
        for name, target in (ema or {}).items():
            part = distribute_tensor(whole_ema[name].to(target.dtype), target.device_mesh, target.placements)
            local(target).copy_(part.to_local())


def has_shards(folder: Path) -> bool:
    return (folder / SHARDED).is_dir()


def consolidate(checkpoint: str | Path, out: str | Path) -> Path:
    """`out/model.safetensors` + `config.json` from the sharded checkpoint `checkpoint` (a `step_*` folder),
    in one process without a launch: the model a run would have saved at that step. Returns `out`."""
    shards = Path(checkpoint) / SHARDED
    if not shards.is_dir():
        raise FileNotFoundError(
            f"{checkpoint} holds no sharded checkpoint ({SHARDED}/): is it a step_* folder?"
        )
    model = VisionTransformer(ViTConfig.from_dict(json.loads((shards / CONFIG).read_text())))
    weights = {f"model.{name}": value for name, value in model.state_dict().items()}
    _read_shards({"model": weights}, shards)
    write_native(model, out, {name.removeprefix("model."): value for name, value in weights.items()})
    return Path(out)


def _read_shards(state: dict[str, Any], shards: Path) -> None:
    """`dcp.load` into `state`, collective under a launch; in one process without the warning that says so."""
    alone = not torch.distributed.is_initialized()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized, assuming")
        dcp.load(state, checkpoint_id=shards, no_dist=alone)


def _unwrapped(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vit_pipelines.training.sharding",
        description="Write model.safetensors from a sharded (FSDP) training checkpoint.",
    )
    parser.add_argument("checkpoint", help="a step_* folder under the run's checkpoint_dir")
    parser.add_argument("out", help="the folder to write model.safetensors and config.json to")
    args = parser.parse_args(argv)
    print(consolidate(args.checkpoint, args.out) / "model.safetensors")


if __name__ == "__main__":
    main()
