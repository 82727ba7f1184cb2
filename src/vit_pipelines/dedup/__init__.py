"""De-duplication of pretraining data against downstream test sets (ViT §4.1, following BiT).

A three-stage near-duplicate search: DCT descriptors of shifted and scaled boxes retrieve candidates from an
index over the (few) test images; a colour check and a band-passed correlation under a refined alignment
verify them; the copy model (`copymodel.py`) keeps only pairs that are the same picture, not look-alikes.
docs/dedup.md has the method, its measured recall and false-pair rate, and the thresholds.
"""

from vit_pipelines.dedup.index import ReferenceIndex
from vit_pipelines.dedup.search import (
    DEFAULT_THRESHOLD,
    DedupConfig,
    Match,
    SearchResult,
    build_index,
    find_near_duplicates,
    join_references,
    search,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "DedupConfig",
    "Match",
    "ReferenceIndex",
    "SearchResult",
    "build_index",
    "find_near_duplicates",
    "join_references",
    "search",
]
