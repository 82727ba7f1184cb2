"""Nodes of the `dedup` pipeline: thin wrappers over `vit_pipelines.dedup`.

The downstream test sets arrive as keyword arguments named after the downstream datasets
(`downstream_datasets` in conf/base/globals.yml): one index covers them all; the report is keyed by name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from matplotlib.figure import Figure
from PIL import ImageOps

from vit_pipelines.data.cache import fingerprint
from vit_pipelines.data.ops import open_image
from vit_pipelines.dedup import DedupConfig, build_index, join_references, search
from vit_pipelines.dedup.plots import plot_pairs
from vit_pipelines.dedup.report import band_counts, embedded_leak_recall, summarise_matches
from vit_pipelines.dedup.search import SKIPPED_EXAMPLES
from vit_pipelines.training.loop import gather_lists, process_state

log = logging.getLogger(__name__)


# how the search runs; the other DedupConfig fields decide the matches, beside the images
HOW_IT_SEARCHES = ("batch_size", "num_proc")


def find_duplicates(
    pretrain: datasets.Dataset, params: dict[str, Any], **test_sets: datasets.Dataset
) -> dict:
    """`search_duplicates`, or, when `params["reuse_dir"]` holds a search of the same images (by their
    datasets' fingerprints) with the same settings by this package version, its result: a re-run whose inputs
    did not change skips the search."""
    settings = asdict(DedupConfig.from_params(params))
    key = hashlib.sha1(
        json.dumps(
            [
                importlib.metadata.version("vit-pipelines"),
                fingerprint(pretrain),
                {name: fingerprint(test) for name, test in sorted(test_sets.items())},
                {k: v for k, v in settings.items() if k not in HOW_IT_SEARCHES},
            ]
        ).encode()
    ).hexdigest()[:16]
    done = Path(params["reuse_dir"]) / f"{key}.json" if params.get("reuse_dir") else None
    if done is not None and done.exists():
        log.info("the same images and settings were searched before: reusing %s", done)
        return json.loads(done.read_text())
    found = search_duplicates(pretrain, params, **test_sets)
    if done is not None and process_state().is_main_process:
        done.parent.mkdir(parents=True, exist_ok=True)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(found))
        tmp.replace(done)
    return found


def search_duplicates(
    pretrain: datasets.Dataset, params: dict[str, Any], **test_sets: datasets.Dataset
) -> dict:
    """Every pretraining image that is a near-duplicate of a test image, with its best match over all sets:
    `{"pretrain_images", "test_images": {set: n}, "matches": [{"pretrain_index", "test_set", "test_index",
    "score", "colour", "mirrored", "shape", "detail", "band"}], "unreadable": {"pretrain"|"test": {reason: n}}, "unreadable_examples":
    {"pretrain": {reason: [row, ...]}}, "queries_per_rank", "seconds"}`. Under `accelerate launch` each rank
    searches its share of the pretraining images."""
    state = process_state()
    config = DedupConfig.from_params(params, state.num_processes)
    for name, test in test_sets.items():
        if len(test) == 0:
            raise ValueError(f"downstream_{name}_test is empty: there is nothing to de-duplicate it against")
    images, owners = join_references(test_sets)
    try:
        index, unreadable_tests = build_index(images, config)
    except ValueError as err:
        raise ValueError(f"downstream test sets {', '.join(test_sets)}: {err}") from err
    if unreadable_tests:  # a test image that cannot be read cannot be checked for copies
        missing = sorted(set(range(len(images))) - set(int(i) for i in index.ids))
        named = ", ".join(f"downstream_{owners[i][0]}_test row {owners[i][1]}" for i in missing[:5])
        raise ValueError(
            f"{len(missing)} test images cannot be read ({unreadable_tests}): {named}"
            f"{', …' if len(missing) > 5 else ''}; repair or remove them"
        )
    result = search(pretrain, index, config, True, state.process_index, state.num_processes)
    mine = [
        {
            "pretrain_index": m.query,
            "test_set": owners[m.reference][0],
            "test_index": owners[m.reference][1],
            "score": round(m.score, 4),
            "colour": round(m.colour, 4),
            "mirrored": m.mirrored,
            "shape": None if m.evidence is None else round(m.evidence.shape, 4),
            "detail": None if m.evidence is None else round(m.evidence.detail, 4),
            "band": "certain" if m.certain else "borderline",
        }
        for m in result.matches
    ]
    # every rank searched its share: all ranks get every share's matches, as one process would have found them
    matches = sorted(gather_lists(mine), key=lambda m: m["pretrain_index"])
    shares = gather_lists([[result.queries, dict(result.skipped), result.seconds, result.skipped_examples]])
    seconds = max(share[2] for share in shares)
    skipped = dict(sum((Counter(share[1]) for share in shares), Counter()))
    examples = {
        r: sorted(i for share in shares for i in share[3].get(r, []))[:SKIPPED_EXAMPLES] for r in skipped
    }
    log.info(
        "%d of %d pretraining images are near-duplicates of test images (%.1f s, %.0f images/s)",
        len(matches),
        len(pretrain),
        seconds,
        len(pretrain) / seconds,
    )
    return {
        "pretrain_images": len(pretrain),
        "test_images": {name: len(ds) for name, ds in test_sets.items()},
        "matches": matches,
        "unreadable": {"pretrain": skipped, "test": unreadable_tests},
        "unreadable_examples": {"pretrain": examples},  # row indices of the first few per reason
        "queries_per_rank": [share[0] for share in shares],
        "seconds": round(seconds, 2),
    }


def report_duplicates(pretrain: datasets.Dataset, duplicates: dict, params: dict[str, Any]) -> dict:
    """Per test set: the pretraining images removed and their [pretrain_index, test_index, score]; how many
    are certain and borderline, and the lowest-scoring removals; the images kept; the settings and speed; on
    the embedded default, recall of its documented leaked copies and how many removals they are."""
    matches = duplicates["matches"]
    report = {
        "pretrain_images": duplicates["pretrain_images"],
        "kept": duplicates["pretrain_images"] - len(matches),
        **summarise_matches(matches, duplicates["test_images"]),
        "unreadable": duplicates["unreadable"],
        "unreadable_examples": duplicates.get("unreadable_examples", {}),
        "config": asdict(DedupConfig.from_params(params, process_state().num_processes)),
        "queries_per_rank": duplicates.get("queries_per_rank", [duplicates["pretrain_images"]]),
        "seconds": duplicates["seconds"],
        "images_per_second": round(duplicates["pretrain_images"] / max(duplicates["seconds"], 1e-9), 1),
    }
    if params.get("known_leaks") == "embedded":
        names = getattr(pretrain.features.get("label"), "names", None)
        report["known_leaks"] = embedded_leak_recall(
            names, len(pretrain), matches, params.get("embedded_seed", 0)
        )
    leaks = report.get("known_leaks", {}).get("found")
    log.info(
        "removed %d pretraining images: %d certain, %d borderline%s",
        len(matches),
        report["bands"]["certain"],
        report["bands"]["borderline"],
        "" if leaks is None else f"; {leaks} of them are the embedded default's planted leaks",
    )
    return report


def plot_duplicates(
    pretrain: datasets.Dataset, duplicates: dict, params: dict[str, Any], **test_sets: datasets.Dataset
) -> Figure:
    """Up to `params["pairs_shown"]` removed pairs (pretraining | test image, mirrored when matched so): the
    borderline ones first, lowest score first, then certain ones evenly spaced from the lowest score to the
    highest, so the most doubtful matches are always in view."""
    matches = sorted(duplicates["matches"], key=lambda m: m["score"])
    borderline = [m for m in matches if m.get("band") == "borderline"][: params["pairs_shown"]]
    certain = [m for m in matches if m.get("band") != "borderline"]
    room = min(len(certain), params["pairs_shown"] - len(borderline))
    picks = np.unique(np.linspace(0, len(certain) - 1, room).round()) if room else []
    shown = borderline + [certain[int(i)] for i in picks]
    rows = sorted({m["pretrain_index"] for m in shown})  # in order: a streamed source reads each part once
    pretrain_images = dict(zip(rows, pretrain[rows]["image"] if rows else [], strict=True))
    pairs = []
    for m in shown:
        test_image = open_image(test_sets[m["test_set"]][m["test_index"]]["image"])[0]
        mirrored = " mirrored" if m["mirrored"] else ""
        band = " borderline" if m.get("band") == "borderline" else ""
        pairs.append(
            (
                open_image(pretrain_images[m["pretrain_index"]])[0],
                ImageOps.mirror(test_image) if m["mirrored"] else test_image,
                f"{m['pretrain_index']} ~ {m['test_set']}[{m['test_index']}]{mirrored} {m['score']:.3f}{band}",
            )
        )
    counts = band_counts(matches)
    return plot_pairs(
        pairs,
        f"{len(pairs)} of {len(matches)} removed pretraining images (left) and their test images: "
        f"{counts['certain']} certain, {counts['borderline']} borderline (shown first)",
    )
