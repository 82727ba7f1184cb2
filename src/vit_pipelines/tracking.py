"""Experiment tracking with MLflow: every `kedro run` is an MLflow run in a local store under the data folder.

What a run logs (main process only): the parameters of the pipelines it runs, flattened (`pretrain.train.lr`);
every saved report's numbers as metrics, and the training histories step by step (loss, accuracy, lr, images/s,
data-wait fraction, evaluations); the reports and figures as artifacts; the model folders as artifacts
(`log_models`). Outputs of a per-dataset or per-task namespace (`finetune.<dataset>.*`, `vtab.test.<task>.*`)
go to one child run per dataset or task, and a fine-tuning learning-rate sweep to one child run per rate under
it. Settings: `conf/base/mlflow.yml` (`enabled: false` turns tracking off).
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.pipeline import Pipeline

from vit_pipelines.kedro_io import ViTModelDataset
from vit_pipelines.training.loop import process_state

log = logging.getLogger(__name__)
HISTORY_KEYS = ("records", "history")  # lists of per-step dicts, logged as metric series
SETTINGS_KEYS = ("config", "model")  # a report's copy of its settings: parameters, not metrics
NOT_A_KEY = re.compile(r"[^\w\-. /]")  # MLflow metric and parameter names allow these characters


def tracking_paths(settings: dict[str, Any], project: Path, data_root: str) -> tuple[str, str]:
    """The store's URI and the artifact folder: relative paths are under `<project>/<data_root>`."""
    folder = project / data_root
    uri = settings.get("uri") or "sqlite:///09_tracking/mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{folder / uri.removeprefix('sqlite:///')}"
    artifacts = settings.get("artifacts") or "09_tracking/artifacts"
    if "://" not in artifacts:
        artifacts = str(folder / artifacts)
    return uri, artifacts


def flat_params(values: Any, prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` → `{"a.b": "1"}`; lists are kept whole (`[0.9, 0.999]`)."""
    if isinstance(values, dict):
        out: dict[str, str] = {}
        for key, value in values.items():
            out.update(flat_params(value, f"{prefix}{key}."))
        return out
    return {_key(prefix.rstrip(".")): json.dumps(values) if not isinstance(values, str) else values}


def flat_metrics(
    values: Any, prefix: str = ""
) -> tuple[dict[str, float], list[tuple[int, dict[str, float]]]]:
    """The numbers in a report: `(scalars, series)`. Scalars are its finite numeric leaves, named by their path;
    `series` holds `(step, numbers)` of every per-step history (`records` / `history` lists) inside it."""
    scalars: dict[str, float] = {}
    series: list[tuple[int, dict[str, float]]] = []
    if isinstance(values, dict):
        for key, value in values.items():
            name = f"{prefix}{key}"
            if key in HISTORY_KEYS and isinstance(value, list):
                series.extend(_history(value, f"{prefix}" if key == "records" else f"{name}."))
            elif key not in SETTINGS_KEYS:
                more, steps = flat_metrics(value, f"{name}.")
                scalars.update(more)
                series.extend(steps)
    elif _number(values):
        scalars[_key(prefix.rstrip("."))] = float(values)
    return scalars, series


def _history(records: list, prefix: str) -> Iterator[tuple[int, dict[str, float]]]:
    for record in records:
        if isinstance(record, dict) and _number(record.get("step")):
            numbers = {
                _key(f"{prefix}{k}"): float(v) for k, v in record.items() if k != "step" and _number(v)
            }
            yield int(record["step"]), numbers


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _key(name: str) -> str:
    return NOT_A_KEY.sub("_", name)[:250]


def child_of(dataset: str) -> tuple[str | None, str]:
    """The child run a namespaced output belongs to and its name there: `finetune.pets.pretrained_result` →
    ("pets", "pretrained_result"), `vtab.test.caltech101.result` → ("caltech101", "test.result"); a
    top-level output → (None, name)."""
    parts = dataset.split(".")
    if len(parts) < 3:
        return None, parts[-1]
    return parts[-2], ".".join([*parts[1:-2], parts[-1]])


class TrackWithMlflow:
    """The MLflow run of a `kedro run` (main process): started before the first node, given every dataset as it
    is saved, ended with the pipeline's status."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.project = Path.cwd()
        self.data_root = "data"
        self.env = "local"
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment = ""
        self.children: dict[str, str] = {}
        self.catalog: Any = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        from vit_pipelines.hooks import data_root

        try:
            self.settings = dict(context.config_loader["mlflow"].get("tracking") or {})
        except KeyError:  # a project without conf/base/mlflow.yml
            self.settings = {}
        self.project, self.data_root, self.env = Path(context.project_path), data_root(context), context.env

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        if not self.settings.get("enabled") or not process_state().is_main_process:
            return
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for talkative in ("alembic", "mlflow.store.db.utils"):  # the store's table set-up, on first use
            logging.getLogger(talkative).setLevel(logging.WARNING)
        uri, artifacts = tracking_paths(self.settings, self.project, self.data_root)
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        name = self.settings.get("experiment") or "vit-pipelines"
        found = self.client.get_experiment_by_name(name)
        self.experiment = found.experiment_id if found else self.client.create_experiment(name, artifacts)
        pipelines = run_params.get("pipeline_names") or ["__default__"]
        tags = {"pipelines": ",".join(pipelines), "kedro_env": self.env or "local"}
        run = self.client.create_run(self.experiment, run_name=" ".join(pipelines), tags=tags)
        self.run_id, self.children, self.catalog = run.info.run_id, {}, catalog
        groups = sorted(
            {n.removeprefix("params:").split(".")[0] for n in pipeline.inputs() if n.startswith("params:")}
        )
        values = catalog.load("parameters") if "parameters" in catalog else {}
        params = flat_params({g: values[g] for g in groups if g in values})
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=items[start : start + 100])
        log.info("tracking in MLflow run %s (%s)", self.run_id, uri)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        if self.run_id is None:
            return
        child, name = child_of(dataset_name)
        run_id = self._child(child) if child else self.run_id
        if isinstance(data, dict):
            self._log_report(run_id, name, data)
            # a fine-tuning sweep: one child run per learning rate
            if name.endswith("_sweep") and isinstance(data.get("dev_accuracy"), dict):
                for lr, accuracy in data["dev_accuracy"].items():
                    self._log_rate(run_id, name.removesuffix("_sweep"), lr, accuracy)
        elif hasattr(data, "savefig"):  # a matplotlib figure
            self.client.log_figure(run_id, data, f"{name}.png")
        elif self.settings.get("log_models", True) and (folder := self._saved_model(dataset_name)):
            self.client.log_artifacts(run_id, str(folder), f"models/{name}")

    @hook_impl
    def after_pipeline_run(self) -> None:
        if self.run_id is not None:
            uri = self.client.tracking_uri.replace(f"{self.project}/", "")  # commands run in the project
            log.info(
                "tracked as MLflow run %s; to browse: mlflow ui --backend-store-uri %s", self.run_id, uri
            )
        self._end("FINISHED")

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._end("FAILED")

    def _log_report(self, run_id: str, name: str, report: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        scalars, series = flat_metrics(report, "" if self._is_history(report) else f"{name}.")
        now = _millis()
        metrics = [Metric(k, v, now, 0) for k, v in scalars.items()]
        metrics += [Metric(k, v, now, step) for step, numbers in series for k, v in numbers.items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per call
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{name}.json"
            path.write_text(json.dumps(report, indent=1, default=str))
            self.client.log_artifact(run_id, str(path), "reports")

    def _log_rate(self, parent: str, start: str, lr: Any, accuracy: Any) -> None:
        """A fine-tuning learning rate's dev accuracy as a run under `parent` (`start`: pretrained or scratch)."""
        from mlflow.entities import Metric, Param

        run_id = self._new_run(f"{start} lr={lr}", parent)
        metrics = [Metric("dev_accuracy", float(accuracy), _millis(), 0)] if _number(accuracy) else []
        params = [Param("lr", str(lr)), Param("start", start)]
        self.client.log_batch(run_id, metrics=metrics, params=params)
        self.client.set_terminated(run_id)

    def _child(self, name: str) -> str:
        """The pipeline run's child run `name`, started on first use."""
        if name not in self.children:
            self.children[name] = self._new_run(name, self.run_id)
        return self.children[name]

    def _new_run(self, name: str, parent: str) -> str:
        run = self.client.create_run(self.experiment, run_name=name, tags={"mlflow.parentRunId": parent})
        return run.info.run_id

    def _is_history(self, report: dict[str, Any]) -> bool:
        return isinstance(report.get("records"), list)

    def _saved_model(self, dataset_name: str) -> Path | None:
        """The folder a model output was saved to, if `dataset_name` is one."""
        dataset = self.catalog.get(dataset_name) if self.catalog is not None else None
        return dataset.saved_folder() if isinstance(dataset, ViTModelDataset) else None

    def _end(self, status: str) -> None:
        if self.run_id is None:
            return
        for child in self.children.values():
            self.client.set_terminated(child, status)
        self.client.set_terminated(self.run_id, status)
        self.run_id = None


def _millis() -> int:
    return int(time.time() * 1000)
