"""Kedro hooks: under `accelerate launch`, ranks other than the main one run quietly."""

from __future__ import annotations

import logging

from kedro.framework.hooks import hook_impl

from vit_pipelines.training.loop import process_state


class QuietNonMainRanks:
    """Ranks other than the main one log warnings and errors only (their progress bars are off from the
    package's import, see `vit_pipelines/__init__.py`), so a multi-process run prints what one process does."""

    @hook_impl
    def before_pipeline_run(self) -> None:
        if process_state().is_main_process:
            return
        logging.getLogger().setLevel(logging.WARNING)
        for name in ("kedro", "vit_pipelines"):
            logging.getLogger(name).setLevel(logging.WARNING)
