"""The end of a run in a few lines (where the results are, the headline numbers, what to run next) and
`summary.md`, the newest result of every pipeline on one page. Kedro-free: the hook hands in the reports."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vit_pipelines.evaluation.plots import metric_label


def _dedup(report: dict[str, Any]) -> str:
    bands = report.get("bands", {})
    return (
        f"removed {report['removed']} of {report['pretrain_images']} pretraining images as copies of test images "
        f"({bands.get('certain', 0)} certain, {bands.get('borderline', 0)} borderline)"
    )


def _pretrain(metrics: dict[str, Any]) -> str:
    return (
        f"minival accuracy {metrics['minival_accuracy']:.1%} (chance {metrics['chance_accuracy']:.1%}) after "
        f"{metrics['steps']} steps; {metrics['train_images_per_second']:.0f} images/s, "
        f"{metrics['wall_seconds'] / 60:.1f} min of training"
    )


def _fewshot(results: dict[str, Any]) -> str:
    parts = []
    for name, result in results["datasets"].items():
        shots = max(result["pretrained"], key=int)
        parts.append(
            f"{name} {shots}-shot {result['pretrained'][shots]['mean']:.1%} "
            f"(random init {result['random_init'][shots]['mean']:.1%})"
        )
    return "linear few-shot accuracy: " + ", ".join(parts)


def _finetune(metrics: dict[str, Any]) -> str:
    parts = [
        f"{name} {r['test_accuracy']:.1%} (from scratch {r['from_scratch']['test_accuracy']:.1%})"
        for name, r in metrics.items()
    ]
    return "fine-tuned test accuracy: " + ", ".join(parts)


def _vtab(results: dict[str, Any]) -> str:
    groups = ", ".join(f"{group} {value:.1%}" for group, value in results["group_mean"].items())
    return f"VTAB mean accuracy {results['mean']:.1%} ({groups})"


def _drloc(results: dict[str, Any]) -> str:
    summary = results["summary"]
    difference = summary["difference"]
    return (
        f"minival accuracy with DRLoc {summary['with']['mean']:.1%}, without {summary['without']['mean']:.1%}; "
        f"DRLoc better on {difference['with_drloc_better_on']} of {difference['seeds']} seeds"
    )


def _scaling(results: dict[str, Any]) -> str:
    gaps = results["vit_minus_resnet"]
    metrics = [k for k in next(iter(gaps.values()), {}) if k != "pretrain_images"]
    names = " / ".join(metric_label(m) for m in metrics)
    per_size = ", ".join(
        f"{g['pretrain_images']} images " + " / ".join(f"{100 * g[m]:+.1f}" for m in metrics)
        for g in gaps.values()
    )
    return f"ViT minus BiT ResNet accuracy ({names}, points): {per_size}"


def _ablations(results: dict[str, Any]) -> str:
    parts = []
    for group, metrics in results["groups"].items():
        best = [f"{metric_label(m)} {v['best']} ({v['mean'][v['best']]:.1%})" for m, v in metrics.items()]
        parts.append(f"{group}: best by " + ", by ".join(best))
    return "; ".join(parts)


def _analysis(numbers: dict[str, Any]) -> str:
    return (
        f"§4.5 figures of a {numbers['model']['depth']}-layer model: patch embedding, position similarity, "
        + ("attention distance, attention rollout")
    )


# catalog name of each pipeline's report → (pipeline, its headline)
HEADLINES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "dedup_report": ("dedup", _dedup),
    "pretrain_metrics": ("pretrain", _pretrain),
    "fewshot_results": ("fewshot", _fewshot),
    "finetune_metrics": ("finetune", _finetune),
    "vtab_results": ("vtab", _vtab),
    "drloc_results": ("drloc", _drloc),
    "scaling_results": ("scaling", _scaling),
    "ablation_results": ("ablations", _ablations),
    "analysis_metrics": ("analysis", _analysis),
}
NEXT = {  # what a user runs after each pipeline
    "dedup": ["pretrain"],
    "pretrain": ["fewshot", "finetune", "vtab", "analysis"],
    "fewshot": ["finetune", "vtab"],
    "finetune": ["vtab", "analysis"],
    "drloc": ["fewshot"],
}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def end_of_run(
    command: str,
    reports: Mapping[str, dict[str, Any]],
    files: Mapping[str, str],
    data_root: str,
    data_bytes: int,
    next_command: Callable[[str], str],
) -> str:
    """The lines printed when `command` finishes: the headline of each report it wrote, the files it wrote
    (`files`: catalog name → path), the data folder's size, and the commands to run next."""
    lines = [f"Finished `{command}`."]
    pipelines = []
    for name, report in reports.items():
        pipeline, headline = HEADLINES[name]
        pipelines.append(pipeline)
        lines.append(f"  {pipeline}: {headline(report)}")
    lines += [f"  {name}: {path}" for name, path in files.items()]
    lines.append(f"  every pipeline's newest results: {data_root}/08_reporting/summary.md")
    lines.append(f"  {data_root}/ now holds {human_bytes(data_bytes)}")
    after = [p for pipeline in pipelines for p in NEXT.get(pipeline, []) if p not in pipelines]
    if after:
        lines.append("  next: " + "; ".join(next_command(p) for p in dict.fromkeys(after)) + "; kedro viz")
    return "\n".join(lines)


def summary_markdown(
    reports: Mapping[str, tuple[dict[str, Any], str, str]], data_root: str, data_bytes: int
) -> str:
    """`summary.md`: for each pipeline that has run, its headline, its report's path and version
    (`reports`: catalog name → (report, path, version or "" when unversioned))."""
    lines = ["# Results: the newest run of each pipeline", ""]
    lines.append(f"Written after every `kedro run`; `{data_root}/` holds {human_bytes(data_bytes)}.")
    for name, (pipeline, headline) in HEADLINES.items():
        if name not in reports:
            continue
        report, path, version = reports[name]
        where = f"`{path}`" + (f" (version {version})" if version else "")
        lines += ["", f"## {pipeline}", "", headline(report) + ".", "", where]
    missing = [pipeline for name, (pipeline, _) in HEADLINES.items() if name not in reports]
    if missing:
        lines += ["", "Not run yet: " + ", ".join(f"`{p}`" for p in missing) + "."]
    return "\n".join(lines) + "\n"
