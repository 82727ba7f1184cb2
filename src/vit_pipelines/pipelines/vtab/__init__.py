"""`kedro run --pipelines vtab`: the VTAB-1k protocol over the tasks in `vtab_tasks` (conf/base/globals.yml)."""

from vit_pipelines.pipelines.vtab.pipeline import create_pipeline

__all__ = ["create_pipeline"]
