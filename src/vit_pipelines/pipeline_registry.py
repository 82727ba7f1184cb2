"""Project pipelines: one folder per pipeline under `pipelines/`, found by name.

Kedro imports only the folder named by `kedro run --pipeline <name>`, so composite pipelines (such as
`pretrain`) assemble their stages inside their own `create_pipeline()`.
"""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        (p for name, p in pipelines.items() if name != "__default__"), Pipeline([])
    )
    return pipelines
