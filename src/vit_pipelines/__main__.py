"""`python -m vit_pipelines` runs the project like `kedro run`; `main` is also what `accelerate launch --tpu
--main_training_function main -m vit_pipelines.__main__ ...` calls once per TPU device."""

import sys
from pathlib import Path

from kedro.framework.cli.utils import find_run_command
from kedro.framework.project import configure_project


def main(*args, **kwargs) -> None:
    package_name = Path(__file__).parent.name
    configure_project(package_name)
    interactive = hasattr(sys, "ps1")
    kwargs["standalone_mode"] = not interactive
    run = find_run_command(package_name)
    run(*args, **kwargs)


if __name__ == "__main__":
    main()
