"""`kedro run` with one-line errors: when the project itself refuses an input or a parameter, the run ends with
that message on stderr and exit code 1, and the full traceback goes to `logs/last_error.log`. Anything else (a
bug, an error inside a library) keeps Kedro's traceback."""

from __future__ import annotations

import difflib
import sys
import traceback
from pathlib import Path

import click
from kedro.framework.cli.project import run as kedro_run

from vit_pipelines.locks import FolderLockedError
from vit_pipelines.training.loop import NonFiniteLossError

ERROR_LOG = Path("logs") / "last_error.log"
REFUSALS = (ValueError, FileNotFoundError, NotADirectoryError, FolderLockedError, NonFiniteLossError)
_PACKAGE = str(Path(__file__).parent)


@click.group(name="vit_pipelines")
def cli() -> None:
    """The project's commands: Kedro's, with `run` ending in one line when the project refuses its input."""


@cli.command("run", params=kedro_run.params, help=kedro_run.help)
def run(**kwargs) -> None:
    try:
        for name in [kwargs.get("pipeline"), *(kwargs.get("pipelines") or [])]:
            check_pipeline_name(name)
        kedro_run.callback(**kwargs)
    except REFUSALS as err:
        if not refused_by_project(err):
            raise
        ERROR_LOG.parent.mkdir(exist_ok=True)
        ERROR_LOG.write_text("".join(traceback.format_exception(err)))
        click.secho(f"Error: {' '.join(str(err).split())}", err=True, fg="red")
        click.echo(f"(full traceback: {ERROR_LOG})", err=True)
        sys.exit(1)


def check_pipeline_name(name: str | None) -> None:
    """A pipeline is a folder of `pipelines/` (or `__default__`): an unknown name is refused with the known
    ones, instead of the import error Kedro's registry raises for it."""
    known = sorted(p.name for p in Path(_PACKAGE, "pipelines").iterdir() if (p / "pipeline.py").exists())
    if name is None or name == "__default__" or name in known:
        return
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ValueError(f"there is no pipeline '{name}': {hint}the pipelines are {', '.join(known)}")


def refused_by_project(err: BaseException) -> bool:
    """The error was raised by this package's code (a check), not inside a library."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(_PACKAGE)
