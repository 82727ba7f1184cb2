"""Peak memory (RSS) and wall time of the default `kedro run --pipelines pretrain`, in a scratch copy of the project.

The run's whole process tree (kedro and any worker it starts) is sampled every 0.2 s; the peak of the summed
resident set size is reported, beside the largest single process's own peak (`VmHWM`, the kernel's high-water
mark since the process's exec, sampled until it exits). `--steps N`
shortens training (every evaluation, probe and checkpoint of the first N steps still happens); the default is
the full configured run.

    python benchmarks/pretrain_memory.py
    python benchmarks/pretrain_memory.py --steps 200

Prints a table and writes `benchmarks/results/pretrain_memory.json` (`benchmarks/run.py` runs everything).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from report import machine, print_table, write_json

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(process: psutil.Process) -> tuple[int, int]:
    """The summed resident set of `process` and its descendants now, and the largest `VmHWM` among them: the
    kernel's own peak RSS of each process since its exec (`ru_maxrss` would also count the benchmark process's
    pages that the forked child held before its exec)."""
    total, largest = 0, 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
            status = Path(f"/proc/{p.pid}/status").read_text()
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            continue
        hwm = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), "0")
        largest = max(largest, int(hwm) * 1024)
    return total, largest


def run(steps: int | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        project = Path(scratch) / "project"
        project.mkdir()
        for name in ("conf", "src", "pyproject.toml", ".telemetry"):
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(source, project / name)
        shutil.rmtree(project / "conf" / "local", ignore_errors=True)  # the defaults, not a user's overrides
        (project / "conf" / "local").mkdir()
        command = ["kedro", "run", "--pipelines", "pretrain"]
        if steps is not None:
            command += ["--params", f"pretrain.train.steps={steps}"]
        env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1"}
        start, peak, largest = time.perf_counter(), 0, 0
        with subprocess.Popen(
            command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        ) as p:
            watched = psutil.Process(p.pid)
            while p.poll() is None:
                total, hwm = tree_rss(watched)
                peak, largest = max(peak, total), max(largest, hwm)
                time.sleep(0.2)
            errors = p.stderr.read().decode(errors="replace")
        seconds = time.perf_counter() - start
        if p.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{errors[-3000:]}")
    return {
        "benchmark": "pretrain_memory",
        "machine": machine(),
        "measured_command": " ".join(command),  # run.py records its own invocation under "command"
        "steps": steps or "as configured",
        "peak_rss_bytes": peak,
        "largest_process_peak_rss_bytes": largest,
        "wall_seconds": seconds,
    }


def report(result: dict[str, Any]) -> list[list[Any]]:
    rows = [
        ["peak RSS, process tree (MiB)", result["peak_rss_bytes"] / 2**20],
        ["peak RSS, largest process (MiB)", result["largest_process_peak_rss_bytes"] / 2**20],
        ["wall time (s)", result["wall_seconds"]],
    ]
    print_table(f"memory of `{result['measured_command']}`", ["", ""], rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/pretrain_memory.json")
    args = parser.parse_args()
    result = run(args.steps)
    report(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
