"""Kedro project settings (https://docs.kedro.org/en/stable/kedro_project_setup/settings.html)."""

import os
import sys
import warnings

from kedro.config import OmegaConfigLoader

from vit_pipelines.hooks import (
    CheckOutputsWritable,
    CheckParameters,
    OneRunPerDataFolder,
    QuietNonMainRanks,
    SummariseTheRun,
    UseRunGlobals,
)
from vit_pipelines.kedro_io import RankAwareCatalog
from vit_pipelines.tracking import TrackWithMlflow

# Under `accelerate launch`, only the main process writes catalog outputs; the other ranks stay quiet.
# Every output location is checked for writing before a pipeline starts.
DATA_CATALOG_CLASS = RankAwareCatalog
HOOKS = (
    UseRunGlobals(),
    CheckParameters(),
    CheckOutputsWritable(),
    OneRunPerDataFolder(),
    QuietNonMainRanks(),
    SummariseTheRun(),
    TrackWithMlflow(),
)

# Logs written to a file or a CI log keep whole lines: rich wraps at 80 columns where it finds no terminal.
if not sys.stdout.isatty():
    os.environ.setdefault("COLUMNS", "200")

# Kedro 1.7's own config loader still calls OmegaConf 2.4's deprecated `register_new_resolver`; nothing a user
# can act on, so it is not shown (the project registers no resolvers of its own).
warnings.filterwarnings(
    "ignore", r"register_new_resolver\(\) is deprecated", UserWarning, r"kedro\.config\.omegaconf_config"
)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment such as `tiny` overrides single keys and leaves the rest of base in place.
    "merge_strategy": {"parameters": "soft", "catalog": "soft", "globals": "soft", "mlflow": "soft"},
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},  # experiment tracking (vit_pipelines.tracking)
}
