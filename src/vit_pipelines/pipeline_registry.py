"""Project pipelines: one folder per pipeline under `pipelines/`, found by name.

Kedro imports only the folder named by `kedro run --pipelines <name>`, so composite pipelines (such as
`pretrain`) assemble their stages inside their own `create_pipeline()`.
"""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    if "pretrain" in pipelines:  # Kedro loads only the pipelines a command names, all for `__default__`
        # a plain `kedro run` is the main job; the evaluations and the DRLoc study are asked for by name
        pipelines["__default__"] = pipelines["pretrain"]
    return pipelines
