"""`kedro run --pipelines ablations`: position embedding (Table 8) and head with learning rate (Fig. 9)."""

from vit_pipelines.pipelines.ablations.pipeline import create_pipeline

__all__ = ["create_pipeline"]
