"""What the downstream pipelines share: the lists they fan out over, and the model they start from.

Kedro builds pipelines before it reads parameters, so the lists live in `globals.yml`: `downstream_datasets`
(few-shot, de-duplication, fine-tuning; each name needs catalog entries `downstream_<name>_train` and `_test`)
and `vtab_tasks` (each name needs an entry in the `vtab.tasks` registry, conf/base/parameters_vtab.yml). They
are read through Kedro's config loader, as every other setting: `base` overridden by the run's environment
(`local`, or the one `--env` names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.config import OmegaConfigLoader
from kedro.pipeline import Pipeline, pipeline

from vit_pipelines.data.embedded import DOWNSTREAM_NAMES
from vit_pipelines.models import VisionTransformer, load_pretrained

_SESSION: dict[str, Any] = {}  # "globals" and "env": the running session's, set by the `UseRunGlobals` hook


def use_run_globals(values: dict[str, Any], env: str | None = None) -> None:
    """Build pipelines from these globals (the session's config loader resolved them for its environment
    `env`, which commands suggested to the user then name)."""
    _SESSION["globals"] = dict(values)
    _SESSION["env"] = env


def run_command(pipeline: str) -> str:
    """`kedro run --pipelines <pipeline>` in the running session's environment (`--env tiny` where it is)."""
    env = _SESSION.get("env")
    return f"kedro run{'' if env in (None, 'local') else f' --env {env}'} --pipelines {pipeline}"


def run_globals(conf_source: str | Path = "conf", env: str | None = None) -> dict[str, Any]:
    """The running session's globals; without a session, what Kedro's config loader resolves from
    `conf_source` for `env` (default: `local`); empty outside a project."""
    if "globals" in _SESSION and env is None and str(conf_source) == "conf":
        return _SESSION["globals"]
    if not (Path(conf_source) / "base").is_dir():
        return {}
    # imported here: settings imports the hooks, which import this module
    from vit_pipelines.settings import CONFIG_LOADER_ARGS

    return dict(OmegaConfigLoader(str(conf_source), env=env, **CONFIG_LOADER_ARGS)["globals"])


def names_from_globals(
    key: str, default: list[str], conf_source: str | Path = "conf", env: str | None = None
) -> list[str]:
    """`key` of the run's globals; `default` where no globals file sets it."""
    names = run_globals(conf_source, env).get(key)
    if names is None:
        return list(default)
    if not names or not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise ValueError(
            f"{conf_source}: {key} in globals.yml must be a non-empty list of identifiers, got {names!r}"
        )
    return list(names)


def downstream_datasets(conf_source: str | Path = "conf", env: str | None = None) -> list[str]:
    """`downstream_datasets` of the run's globals; the embedded sets outside a project."""
    return names_from_globals("downstream_datasets", list(DOWNSTREAM_NAMES), conf_source, env)


def vtab_tasks(conf_source: str | Path = "conf", env: str | None = None) -> list[str]:
    """`vtab_tasks` of the run's globals; the embedded stand-in suite outside a project."""
    return names_from_globals("vtab_tasks", list(DOWNSTREAM_NAMES), conf_source, env)


def downstream_split(name: str, split: str) -> str:
    """The catalog name of a downstream set's split (conf/base/catalog.yml: `downstream_{name}_train`)."""
    return f"downstream_{name}_{split}"


def start_model(
    pretrained_model: VisionTransformer | None, params: dict[str, Any], *, pipeline: str, **load_options: Any
) -> VisionTransformer:
    """The checkpoint named by `params["checkpoint"]["path"]` (`load_pretrained` with `load_options`), else the
    latest pretraining output; a clear error when there is neither."""
    checkpoint = params.get("checkpoint") or {}
    if checkpoint.get("path"):
        return load_pretrained(checkpoint["path"], format=checkpoint.get("format", "auto"), **load_options)
    if pretrained_model is None:
        raise ValueError(
            f"no pretrained model found: run `{run_command('pretrain')}` first, or set "
            f"{pipeline}.checkpoint.path (and format) in conf/local/parameters_{pipeline}.yml"
        )
    return pretrained_model


def for_each_downstream_dataset(
    template: Pipeline, prefix: str, shared: set[str], parameters: set[str]
) -> tuple[Pipeline, list[str]]:
    """`template` once per downstream dataset, in namespace `<prefix>.<name>`, reading that set's splits as
    `train_raw` and `test_raw`; the `shared` inputs and `parameters` are the same for every set. Returns the
    pipelines and the dataset names (for the report's inputs, `<prefix>.<name>.<output>`; the nodes around
    them belong to namespace `<prefix>`, so the whole pipeline is one namespace in `kedro viz`)."""
    names = downstream_datasets()
    per_dataset = [
        pipeline(
            template,
            namespace=f"{prefix}.{name}",
            inputs={
                **{s: s for s in shared},
                "train_raw": downstream_split(name, "train"),
                "test_raw": downstream_split(name, "test"),
            },
            parameters=parameters,
        )
        for name in names
    ]
    return sum(per_dataset, Pipeline([])), names
