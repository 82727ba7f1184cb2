"""Shared by the end-to-end tests: a fresh copy of the project and a `kedro` runner for it."""

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON_WARNING = re.compile(r"^.*\b\w*Warning: .*$", re.MULTILINE)  # as `warnings` and Kedro's log print them


def copy_project(destination: Path) -> Path:
    """A copy of the project without its data, as a fresh clone would have it."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("conf", "src", "notebooks", "pyproject.toml", ".telemetry"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "local"))
        else:
            shutil.copy(source, destination / name)
    (destination / "conf" / "local").mkdir(exist_ok=True)
    (destination / "data").mkdir()
    return destination


def run_in(project: Path, *command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `command` in `project` with Kedro telemetry off; fail the test with the output's tail, or with the
    first Python warning it printed (the project's use of its libraries must not cause any)."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", **(env or {})}
    result = subprocess.run(
        list(command), cwd=project, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warned = PYTHON_WARNING.search(result.stdout + result.stderr)
    assert warned is None, f"{' '.join(command)} warned: {warned.group(0).strip()}"
    return result


def newest(path: Path) -> Path:
    """The newest version of a versioned catalog output `path` (Kedro's `<path>/<version>/<name>`)."""
    versions = sorted(path.glob(f"*/{path.name}"))
    assert versions, f"no version of {path}"
    return versions[-1]
