"""What a de-duplication run did, from its matches: per test set, the certain and borderline bands, the
lowest-scoring removals, and on the embedded default how its planted leaks fared."""

from __future__ import annotations

from collections import Counter
from typing import Any

from vit_pipelines.data import embedded

LOWEST_SHOWN = 5  # lowest-scoring removals listed in the report


def summarise_matches(matches: list[dict], test_images: dict[str, int]) -> dict[str, Any]:
    """`matches` as `find_duplicates` gives them → removed, bands, lowest scores and, per test set, the images
    removed and their `[pretrain_index, test_index, score]`."""
    return {
        "removed": len(matches),
        "bands": band_counts(matches),
        "lowest_scores": sorted(matches, key=lambda m: m["score"])[:LOWEST_SHOWN],
        "test_sets": {
            name: {
                "test_images": size,
                "removed": sum(m["test_set"] == name for m in matches),
                "pairs": [
                    [m["pretrain_index"], m["test_index"], m["score"]]
                    for m in matches
                    if m["test_set"] == name
                ],
            }
            for name, size in test_images.items()
        },
    }


def band_counts(matches: list[dict]) -> dict[str, int]:
    """How many of `matches` are certain and how many borderline."""
    bands = Counter(m.get("band", "certain") for m in matches)
    return {"certain": bands["certain"], "borderline": bands["borderline"]}


def embedded_leak_recall(
    class_names: list[str] | None, num_images: int, matches: list[dict], seed: int
) -> dict:
    """The matches against `embedded.leaked_copies` if the pretraining set is the embedded default (by its
    class names): recall, how many removals the leaks are, the misses and the other removals."""
    if class_names != list(embedded.PRETRAIN_CLASS_NAMES):
        return {"skipped": "the pretraining set is not the embedded default"}
    leaks = {leak["pretrain_index"]: leak for leak in embedded.leaked_copies(num_images, seed)}
    found = {m["pretrain_index"]: m for m in matches}
    hits = [q for q, leak in leaks.items() if found.get(q, {}).get("test_set") == leak["downstream"]]
    return {
        "leaked_copies": len(leaks),
        "found": len(hits),
        "recall": len(hits) / len(leaks) if leaks else None,
        "matched_to_the_copied_image": sum(found[q]["test_index"] == leaks[q]["test_index"] for q in hits),
        "removals_that_are_leaks": f"{len(hits)} of {len(matches)}",
        "missed": [leak for q, leak in leaks.items() if q not in hits],
        "removed_not_leaked": [m for q, m in found.items() if q not in leaks],
    }
