"""Kedro hooks: parameters and output folders checked before any work, one run per data folder, and quiet
non-main ranks under `accelerate launch`."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from kedro.framework.hooks import hook_impl
from kedro.pipeline import Pipeline

from vit_pipelines.dedup import DedupConfig
from vit_pipelines.evaluation.fewshot import check_fewshot_params
from vit_pipelines.evaluation.studies import check_study
from vit_pipelines.kedro_io import ViTModelDataset, version_earlier_result
from vit_pipelines.locks import RunLock
from vit_pipelines.models.config import BiTConfig, ViTConfig
from vit_pipelines.pipelines.downstream import run_command, use_run_globals
from vit_pipelines.summary import HEADLINES, end_of_run, folder_bytes, summary_markdown
from vit_pipelines.training.loop import TrainConfig, process_state
from vit_pipelines.training.objectives import DRLocConfig
from vit_pipelines.training.saving import writable_folder

log = logging.getLogger(__name__)


class CheckOutputsWritable:
    """Before a pipeline starts, every file or folder it will write must be writable: a clear error then, not
    after an hour of training. A result an earlier release saved without a version is moved into one first."""

    @hook_impl
    def before_pipeline_run(self, pipeline: Pipeline, catalog: Any) -> None:
        if not process_state().is_main_process:
            return
        for name in sorted(pipeline.all_outputs()):
            if name not in catalog:
                continue  # an in-memory dataset
            if moved := version_earlier_result(catalog[name]):
                log.info("%s: the earlier unversioned result is now version %s", name, moved.name)
            target = getattr(catalog[name], "_filepath", None) or getattr(catalog[name], "_path", None)
            if target is None:
                continue
            try:
                writable_folder(Path(str(target)).parent)
            except OSError as err:
                raise OSError(
                    f"cannot write {name!r} to {target}: {err}. Fix the folder, or point data_root elsewhere "
                    "(conf/local/globals.yml)"
                ) from err


# registries users extend with their own names (vtab.tasks, the studies' models, subsets and arms)
OPEN_GROUPS = ("tasks", "models", "subsets", "arms")
FIELD_GROUPS = {  # groups whose keys are a dataclass's fields (the base files set only some of them)
    "model": {f.name for f in dataclasses.fields(ViTConfig)}
    | {f.name for f in dataclasses.fields(BiTConfig)},
    "train": {f.name for f in dataclasses.fields(TrainConfig)},
    "drloc": {f.name for f in dataclasses.fields(DRLocConfig)},
}


def check_known_keys(values: Any, known: Any, path: str) -> None:
    """Every key of the dict `values` must exist in `known` (the base configuration's), at every depth, or be a
    field of the dataclass its group stands for: a typo such as `pretrain.trian` or `data.minival_fractoin`
    is an error listing the keys that exist, not a setting silently ignored."""
    name = path.rstrip(".").rsplit(".", 1)[-1]
    if not isinstance(values, dict) or not isinstance(known, dict) or name in OPEN_GROUPS:
        return
    allowed = set(known) | FIELD_GROUPS.get(name, set())
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"unknown parameters {[path + k for k in unknown]}; known here: {sorted(allowed)}")
    for key, value in values.items():
        check_known_keys(value, known.get(key), f"{path}{key}.")


def base_parameters(conf_source: str | Path, base_env: str = "base") -> dict[str, Any]:
    """The keys and values of `<conf>/<base_env>/parameters*.yml`, merged (interpolations left as text)."""
    merged: dict[str, Any] = {}
    for path in sorted(Path(conf_source, base_env).glob("parameters*.yml")):
        _merge(merged, yaml.safe_load(path.read_text()) or {})
    return merged


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def training_configs(group: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The training parameters a parameter group's runs will use (`lr` and `steps` from grids filled in)."""
    train = params.get("train")
    if not isinstance(train, dict) or group in STUDIES:  # a study's are overrides: `check_study` builds them
        return []
    if group == "finetune":
        return [{**train, "lr": lr} for lr in params.get("lr_grid", [])]
    if group == "vtab":
        return [{**train, **setting} for setting in params.get("settings", [])]
    return [train]


STUDIES = ("scaling", "ablations")


def check_group_settings(group: str, params: dict[str, Any]) -> None:
    """The settings of de-dup and of the few-shot probes, range-checked as the training settings are."""
    if group == "dedup":
        DedupConfig.from_params(params)
    probes = {"fewshot": params} if group == "fewshot" else {}
    if group == "pretrain" and (params.get("fewshot") or {}).get("enabled"):
        probes["pretrain.fewshot"] = params["fewshot"]
    for where, values in probes.items():
        check_fewshot_params(values, where)


def data_root(context: Any) -> str:
    """The run's data folder, relative to the project (`data_root` in the environment's globals.yml)."""
    return context.config_loader["globals"].get("data_root", "data")


class UseRunGlobals:
    """Pipelines are built from the globals the session's config loader resolved (`base` + the run's
    environment), so what `kedro run --env X` reads is what the pipeline code reads."""

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        use_run_globals(context.config_loader["globals"], context.env)


class CheckParameters:
    """Before the first node, every parameter key must be one the base configuration knows (at any depth),
    and every training setting the pipeline will use is built and range-checked, so `steps: 0` or a typo'd key
    fails in seconds, not after de-duplication and preprocessing."""

    def __init__(self) -> None:
        self.known: dict[str, Any] | None = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        loader = context.config_loader
        self.known = base_parameters(loader.conf_source, getattr(loader, "base_env", None) or "base")

    @hook_impl
    def before_pipeline_run(self, pipeline: Pipeline, catalog: Any) -> None:
        if self.known and "parameters" in catalog:
            check_known_keys(catalog.load("parameters"), self.known, "")
        for name in sorted(pipeline.inputs()):
            group = name.removeprefix("params:")
            if name.startswith("params:") and "." not in group and name in catalog:
                for values in training_configs(group, catalog.load(name)):
                    try:
                        TrainConfig.from_params(values)
                    except (TypeError, ValueError) as err:
                        raise ValueError(f"{group}.train: {err}") from err
                check_group_settings(group, catalog.load(name))
                if group in STUDIES:
                    check_study(catalog.load("params:pretrain"), catalog.load(name), group)


class OneRunPerDataFolder:
    """The main process of a `kedro run` holds `<data_root>/.run.lock` from the first node to the end (see
    `vit_pipelines.locks`): a second run into the same folder is refused with the first one named."""

    def __init__(self) -> None:
        self.lock: RunLock | None = None
        self.folder: Path | None = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self.folder = Path(context.project_path) / data_root(context)

    @hook_impl
    def before_pipeline_run(self) -> None:
        if self.folder is not None and process_state().is_main_process:
            self.lock = RunLock(self.folder)
            self.lock.acquire()

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._release()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class SummariseTheRun:
    """After a run (main process): its headline numbers, where its models and reports are and what to run
    next, logged; `<data_root>/08_reporting/summary.md` rewritten with the newest result of every pipeline."""

    def __init__(self) -> None:
        self.project: Path | None = None
        self.data_root = "data"

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self.project = Path(context.project_path)
        self.data_root = data_root(context)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        if self.project is None or not process_state().is_main_process:
            return
        outputs = pipeline.all_outputs()
        saved = {
            name: catalog.get(name) for name in set(HEADLINES) | outputs if name in catalog
        }  # not in memory
        newest = {}  # every pipeline's report: name → (report, path, version)
        for name in HEADLINES:
            if name in saved and saved[name].exists():
                path, version = self._newest(saved[name])
                newest[name] = (catalog.load(name), path, version)
        files = {}
        for name in sorted(outputs & set(saved)):
            layer = ((getattr(saved[name], "metadata", None) or {}).get("kedro-viz") or {}).get("layer")
            if layer in ("models", "reporting") and saved[name].exists():
                files[name] = self._newest(saved[name])[0]
        root = self.project / self.data_root
        size = folder_bytes(root)
        reports = {name: newest[name][0] for name in HEADLINES if name in newest and name in outputs}
        names = ",".join(run_params.get("pipeline_names") or ["__default__"])
        log.info("%s", end_of_run(run_command(names), reports, files, self.data_root, size, run_command))
        summary = root / "08_reporting" / "summary.md"
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(summary_markdown(newest, self.data_root, size))

    def _newest(self, dataset: Any) -> tuple[str, str]:
        """The path (relative to the project) and version ("" if unversioned) of a dataset's newest save."""
        if getattr(dataset, "_version", None):
            path = Path(dataset.list_versions()[0])
            version = path.parent.name
            path = path.parent if isinstance(dataset, ViTModelDataset) else path
        else:
            path = Path(str(getattr(dataset, "_filepath", "")))
            version = ""
        return os.path.relpath(path, self.project), version


class QuietNonMainRanks:
    """Ranks other than the main one log warnings and errors only (their progress bars are off from the
    package's import, see `vit_pipelines/__init__.py`), so a multi-process run prints what one process does.
    Decided per record by the rank that logs it: where ranks are threads of one process (XLA), rank 0 still
    logs everything."""

    @hook_impl
    def before_pipeline_run(self) -> None:
        if process_state().num_processes == 1:
            return
        for handler in logging.getLogger().handlers:
            if _main_rank_or_warning not in handler.filters:
                handler.addFilter(_main_rank_or_warning)


def _main_rank_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or process_state().is_main_process
