"""Saving during training: model folders (safetensors beside `config.json`) and the training state for exact
resume. `models/checkpoints.py` reads and converts checkpoint formats; this module writes and resumes runs.

Nothing here unpickles arbitrary objects: weights are safetensors and optimiser state is read with
`torch.load(weights_only=True)`. Every write goes to a temporary folder renamed into place, so a crash never
leaves a half-written checkpoint where a resume would find it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vit_pipelines.models.checkpoints import (
    CONFIG,
    WEIGHTS,
    load_pretrained,
    newest_version,
    read_native,
    write_native,
)
from vit_pipelines.models.vit import VisionTransformer
from vit_pipelines.training.sharding import is_sharded, load_sharded, load_whole, save_sharded

LABELS = "labels.json"  # class id → name, beside a model trained on named classes
OPTIMIZER = "optimizer.pt"
STATE = "trainer_state.json"
EMA = "ema.safetensors"  # the float32 Polyak / EMA weights, when the run keeps them
OBJECTIVE = "objective.safetensors"  # the training objective's own weights (DRLoc MLP, [mask] token), if any


def writable_folder(path: str | Path) -> Path:
    """The nearest existing folder at or above `path`, once a file could be created in it (what is missing
    below it is created when saving). OSError otherwise; NotADirectoryError when a file is in the way."""
    folder = Path(path)
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file")
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
        pass
    return folder


def _replace_atomically(folder: Path, fill: Any) -> None:
    tmp = _fresh_tmp(folder)
    fill(tmp)
    _publish(tmp, folder)


def _tmp_of(folder: Path) -> Path:
    """Where `folder` is filled before `_publish` renames it into place."""
    return folder.with_name(folder.name + ".tmp")


def _fresh_tmp(folder: Path) -> Path:
    tmp = _tmp_of(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, folder: Path) -> None:
    """`tmp` renamed to `folder`, replacing it."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model: VisionTransformer, folder: str | Path) -> None:
    """`folder/model.safetensors` + `folder/config.json`, and `folder/labels.json` (`{"id2label": {id:
    name}}`) when the model carries `class_names`; other files in `folder` (checkpoints/) stay."""
    folder = Path(folder)
    tmp = folder / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_native(model, tmp)
    names = getattr(model, "class_names", None)
    (folder / LABELS).unlink(missing_ok=True)
    if names:
        (tmp / LABELS).write_text(json.dumps({"id2label": dict(enumerate(names))}, indent=1))
    for name in (LABELS, CONFIG, WEIGHTS):  # weights last: their presence marks a complete checkpoint
        if (tmp / name).exists():
            (tmp / name).replace(folder / name)
    tmp.rmdir()


def load_model(folder: str | Path) -> VisionTransformer:
    """The model `save_model` wrote to `folder` (or to the newest version in it), eval mode, with its
    `class_names` if it has them."""
    folder = newest_version(folder)
    model = load_pretrained(folder, format="native")
    labels = Path(folder) / LABELS
    if labels.exists():
        id2label = json.loads(labels.read_text())["id2label"]
        model.class_names = [id2label[str(i)] for i in range(len(id2label))]
    return model


def save_training_state(
    root: str | Path,
    step: int,
    model: VisionTransformer,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
    ema: Mapping[str, torch.Tensor] | None = None,
    objective: Mapping[str, torch.Tensor] | None = None,
    writer: CheckpointWriter | None = None,
) -> Path:
    """Write `root/step_XXXXXXX/` (weights, optimiser, EMA and objective weights if any,
    `trainer_state.json`) and keep the newest `keep`. Every tensor is copied to host memory first; with `writer`
    the files are then written in its thread while training goes on."""
    folder = _step_folder(root, step)
    weights, optimizer_state = host_copy(model.state_dict()), host_copy(optimizer.state_dict())
    extra = {name: host_copy(dict(t)) for name, t in ((EMA, ema), (OBJECTIVE, objective)) if t is not None}
    trainer_state = json.dumps({**state, "step": step}, indent=1)

    def fill(tmp: Path) -> None:
        write_native(model, tmp, weights)
        torch.save(optimizer_state, tmp / OPTIMIZER)
        for name, tensors in extra.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / name)
        (tmp / STATE).write_text(trainer_state)

    def write() -> None:
        _replace_atomically(folder, fill)
        _keep_newest(root, keep)

    if writer is None:
        write()
    else:
        writer.submit(write)
    return folder


def objective_state(objective: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The objective's own trained tensors (DRLoc's MLP, the [mask] token), saved beside the model's."""
    own = {k: v for k, v in objective.state_dict(keep_vars=True).items() if not k.startswith("model.")}
    return own or None


def _step_folder(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def _keep_newest(root: str | Path, keep: int) -> None:
    for stale in sorted(Path(root).glob("step_???????"))[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)


def save_sharded_training_state(
    root: str | Path,
    step: int,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
    ema: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """`save_training_state` for a sharded run (collective): every rank writes its shards of the weights,
    optimiser state and EMA into `root/step_XXXXXXX/sharded/`; rank 0 adds `trainer_state.json` last and
    renames the folder into place. `root` must be on storage every rank writes to."""
    folder, main = _step_folder(root, step), torch.distributed.get_rank() == 0
    tmp = _tmp_of(folder)
    if main:
        _fresh_tmp(folder)
    torch.distributed.barrier()
    save_sharded(tmp, objective, optimizer, ema)
    if main:
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1))
        _publish(tmp, folder)
        _keep_newest(root, keep)
    return folder


def load_sharded_training_state(
    folder: Path,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint of `save_sharded_training_state` (written by any number of ranks) into `objective`
    and `optimizer`, sharded or not, and in place into `ema`; returns its `trainer_state.json`."""
    load_sharded(folder, objective, optimizer, ema)
    return json.loads((folder / STATE).read_text())


def host_copy(value: Any) -> Any:
    """`value` with every tensor (in nested dicts, lists and tuples) copied to host memory: a checkpoint's
    content as of this moment, whatever training does next."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(host_copy(v) for v in value)
    return value


class CheckpointWriter:
    """Writes checkpoints in one background thread, one at a time, so that training does not wait for the disk
    (ViT-H with EMA: ~10 GB per checkpoint). `submit` waits for the previous write first; `wait` (at the end of
    training) re-raises a write's error in the training thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="checkpoint-writer")
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as err:  # reported in the training thread by the next `wait`
            self._error = err

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def latest_training_state(root: str | Path) -> Path | None:
    """The newest complete `step_*` folder under `root`, or None."""
    done = [p for p in sorted(Path(root).glob("step_???????")) if (p / STATE).exists()]
    return done[-1] if done else None


def load_training_state(
    folder: Path,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Restore weights, optimiser state and the objective's own weights into `objective` (wrapping the model,
    sharded or not) and `optimizer`, and the EMA weights in place into `ema`; returns the saved
    `trainer_state.json`."""
    weights = {f"model.{name}": value for name, value in read_native(folder)[1].items()}
    weights.update(_saved(folder, OBJECTIVE) if objective_state(objective) else {})
    moments = torch.load(folder / OPTIMIZER, weights_only=True, map_location="cpu")
    saved_ema = _saved(folder, EMA) if ema is not None else None
    if is_sharded(objective):
        load_whole(objective, optimizer, weights, moments, ema, saved_ema)
    else:
        objective.load_state_dict(weights)
        optimizer.load_state_dict(moments)
        with torch.no_grad():
            for key, value in (ema or {}).items():
                value.copy_(saved_ema[key])
    return json.loads((folder / STATE).read_text())


def _saved(folder: Path, name: str) -> dict[str, torch.Tensor]:
    if not (folder / name).exists():
        raise FileNotFoundError(f"{folder} holds no {name} to resume from")
    return load_file(folder / name)
