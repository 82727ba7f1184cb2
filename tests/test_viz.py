"""`kedro viz` shows the project's pipelines; `mlflow ui` shows its tracked runs.

1. `kedro viz build` (run in a throw-away copy of the project, so the working tree stays clean) writes a static
   site whose JSON API lists the registered pipelines, the `pretrain` pipeline's nodes, edges and catalog datasets.
2. That site, served on 127.0.0.1 and rendered by headless Chromium, draws the flowchart: an `<svg>` holding one
   `pipeline-node` element per task/dataset, labelled with the node names, and a non-blank screenshot.
3. `mlflow ui` shows a run the tracking hook wrote, with its metric charts.
   The browser parts are skipped only when no `chromium` executable is on PATH.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from vit_pipelines.pipelines.pretrain import create_pipeline

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Top-level entries of the project that `kedro viz build` does not need (or that it writes: `build/`).
NOT_COPIED = {
    "data",
    "build",
    "dist",
    ".git",
    ".viz",
    ".pytest_cache",
    ".ruff_cache",
    ".benchmarks",
    "benchmarks",
}
# Every task of `pretrain` must appear; more are read from `create_pipeline()`.
PRETRAIN_TASKS = {
    "preprocess_pretrain_images",
    "report_pretrain_cache",
    "pretrain_vit",
    "evaluate_pretrained_vit",
}
PRETRAIN_CATALOG_DATASETS = {"pretrained_model", "pretrain_metrics"}
KEDRO_TIMEOUT_S = 120
CHROMIUM_TIMEOUT_S = 90
WINDOW = (1600, 1000)


def _env() -> dict[str, str]:
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", PYTHONWARNINGS="ignore")
    env.pop("KEDRO_ENV", None)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in its own process group; on timeout kill the whole group (Chromium forks helpers) and fail."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{' '.join(cmd[:3])} timed out after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _pretty(name: str) -> str:
    """kedro-viz can show `preprocess_pretrain_images` as "Preprocess Pretrain Images"; compare either form."""
    return re.sub(r"[\s_]+", " ", name).strip().lower()


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("viz") / "project"

    def ignore(directory: str, names: list[str]) -> set[str]:
        top = Path(directory).resolve() == PROJECT_ROOT
        return {n for n in names if (top and n in NOT_COPIED) or n == "__pycache__"}

    shutil.copytree(PROJECT_ROOT, root, ignore=ignore)
    return root


@pytest.fixture(scope="module")
def registered_pipelines(project_copy: Path) -> set[str]:
    result = _run(["kedro", "registry", "list"], project_copy, KEDRO_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    names = set(re.findall(r"^- (\S+)\s*$", result.stdout, flags=re.MULTILINE))
    assert {"__default__", "pretrain"} <= names, result.stdout
    return names


@pytest.fixture(scope="module")
def viz_build(project_copy: Path) -> Path:
    result = _run(["kedro", "viz", "build"], project_copy, KEDRO_TIMEOUT_S)
    log = f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    # `kedro viz build` exits 0 even when it fails (e.g. a pipeline that does not import): check its output too.
    assert result.returncode == 0, log
    assert "ERROR" not in result.stdout + result.stderr, log
    build = project_copy / "build"
    assert (build / "index.html").is_file() and (build / "api" / "main").is_file(), log
    return build


def _api(build: Path, *parts: str) -> dict:
    return json.loads(build.joinpath("api", *parts).read_text())


def test_build_lists_registered_pipelines(viz_build: Path, registered_pipelines: set[str]) -> None:
    main = _api(viz_build, "main")
    assert {p["id"] for p in main["pipelines"]} == registered_pipelines
    assert main["selected_pipeline"] == "__default__"
    for name in registered_pipelines:
        assert _api(viz_build, "pipelines", name)["selected_pipeline"] == name
    assert (viz_build / "api" / "pipelines" / "pretrain").is_file()


def test_each_study_run_is_a_group_of_its_own(viz_build: Path) -> None:
    graph = _api(viz_build, "pipelines", "scaling")
    groups = set(graph["modular_pipelines"])  # kedro viz draws a namespace as one collapsible box
    runs = {f"scaling.{m}.{s}" for m in ("vit_ti", "bit_r26") for s in ("p10", "p30", "p100")}
    assert runs <= groups, groups
    arms = _api(viz_build, "pipelines", "ablations")["modular_pipelines"]
    assert {"ablations.posemb_none", "ablations.gap_lr_low"} <= set(arms)


def test_build_shows_pretrain_nodes_edges_and_datasets(viz_build: Path) -> None:
    pipeline = create_pipeline()
    graph = _api(viz_build, "pipelines", "pretrain")
    by_name = {n["name"]: n for n in graph["nodes"]}

    tasks = {n.name for n in pipeline.nodes}
    assert PRETRAIN_TASKS <= tasks
    assert {name for name, n in by_name.items() if n["type"] == "task"} == tasks
    for name in tasks:
        assert "pretrain" in by_name[name]["pipelines"]

    datasets = pipeline.datasets()
    assert PRETRAIN_CATALOG_DATASETS <= datasets
    assert datasets <= by_name.keys(), datasets - by_name.keys()

    # Datasets declared in the catalog carry its type and layer (`metadata: {kedro-viz: {layer: ...}}`).
    catalog = yaml.safe_load((PROJECT_ROOT / "conf" / "base" / "catalog.yml").read_text())
    declared = {name for name in datasets if name in catalog}
    assert PRETRAIN_CATALOG_DATASETS <= declared
    for name in declared:
        node, entry = by_name[name], catalog[name]
        assert node["type"] == "data", node
        assert node["dataset_type"].rsplit(".", 1)[-1] == entry["type"].rsplit(".", 1)[-1], (node, entry)
        layer = (entry.get("metadata") or {}).get("kedro-viz", {}).get("layer")
        if layer:
            assert node["layer"] == layer, (node, entry)

    # Every input → task and task → output of the pipeline is an edge of the drawn graph.
    ids = {name: n["id"] for name, n in by_name.items()}
    edges = {(e["source"], e["target"]) for e in graph["edges"]}
    for n in pipeline.nodes:
        for dataset in n.inputs:
            assert (ids[dataset], ids[n.name]) in edges, (dataset, n.name)
        for dataset in n.outputs:
            assert (ids[n.name], ids[dataset]) in edges, (n.name, dataset)

    # One page per node (the side panel's details).
    for name in tasks | PRETRAIN_CATALOG_DATASETS:
        assert (viz_build / "api" / "nodes" / ids[name]).is_file(), name


# ----------------------------------------------------------------------------------------------------------- browser


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requested: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.requested.append(self.path)
        super().do_GET()


@pytest.fixture(scope="module")
def served(viz_build: Path):
    requested: list[str] = []
    handler = type("Handler", (_QuietHandler,), {"requested": requested})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(viz_build))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _FlowchartParser(html.parser.HTMLParser):
    """Collects the flowchart's `<g class="pipeline-node ...">` elements inside `<svg id="pipeline-graph">`."""

    def __init__(self) -> None:
        super().__init__()
        self.in_graph = 0  # depth inside the flowchart's <svg>, 0 when outside
        self.nodes: list[dict[str, str]] = []
        self.labels: list[str] = []
        self._in_label = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "svg" and (a.get("id") == "pipeline-graph" or self.in_graph):
            self.in_graph += 1
        elif self.in_graph and tag == "g" and "pipeline-node" in classes:
            self.nodes.append(a)
        elif self.in_graph and tag == "text" and "pipeline-node__text" in classes:
            self._in_label = True
            self.labels.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg" and self.in_graph:
            self.in_graph -= 1
        elif tag == "text":
            self._in_label = False

    def handle_data(self, data: str) -> None:
        if self._in_label:
            self.labels[-1] += data


def test_browser_draws_pretrain_flowchart(served, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip(
            "no `chromium` on PATH (Debian: apt-get install -y chromium); the viz build was still checked"
        )
    base_url, requested = served
    screenshot = tmp_path / "kedro-viz-pretrain.png"
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        # Offline: fail every other host (e.g. Google Fonts in index.html) at once instead of waiting on DNS.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--hide-scrollbars",
        "--virtual-time-budget=15000",
        f"--screenshot={screenshot}",
        "--dump-dom",
        f"{base_url}/?pid=pretrain",  # `pid` selects the pipeline, as the drop-down does
    ]
    result = _run(cmd, tmp_path, CHROMIUM_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    dom = result.stdout
    assert "/api/main" in requested and "/api/pipelines/pretrain" in requested, requested

    parser = _FlowchartParser()
    parser.feed(dom)
    assert parser.nodes, f"no pipeline-node in <svg id=pipeline-graph>; DOM starts:\n{dom[:2000]}"
    drawn = {a["data-node-fullname"]: a for a in parser.nodes}
    pipeline = create_pipeline()
    tasks = {n.name for n in pipeline.nodes}
    assert PRETRAIN_TASKS <= tasks
    for name in tasks:
        assert drawn.get(name, {}).get("data-node-type") == "task", (name, sorted(drawn))
        assert "pipeline-node--task" in drawn[name]["class"].split()
    for name in PRETRAIN_CATALOG_DATASETS:
        assert drawn.get(name, {}).get("data-node-type") == "data", (name, sorted(drawn))
    # Laid out: the nodes sit at different places.
    assert len({a.get("transform") for a in parser.nodes}) == len(parser.nodes)
    # Readable labels (raw or prettified names).
    labels = {_pretty(label) for label in parser.labels}
    for name in tasks | PRETRAIN_CATALOG_DATASETS:
        assert _pretty(name) in labels, (name, sorted(labels))
    # The pipeline selector shows `pretrain`.
    assert re.search(r'class="dropdown__label"><span>pretrain</span>', dom), (
        "pipeline selector not on pretrain"
    )

    from PIL import Image  # the project depends on pillow

    assert screenshot.is_file() and screenshot.stat().st_size > 30_000, screenshot
    with Image.open(screenshot) as image:
        rgb = image.convert("RGB")
    assert rgb.size == WINDOW
    colours = rgb.getcolors(maxcolors=1 << 24)
    assert colours is not None and len(colours) > 200, "screenshot is (nearly) one colour"
    # The flowchart area (right of the side panels) is not blank: node pills, labels and edges are drawn.
    width, height = rgb.size
    area = rgb.crop((int(width * 0.35), 0, int(width * 0.75), int(height * 0.6)))
    background = max(area.getcolors(maxcolors=1 << 24))[0]  # pixel count of the commonest colour
    drawn_fraction = 1 - background / (area.width * area.height)
    assert drawn_fraction > 0.01, f"flowchart area looks blank ({drawn_fraction:.2%} non-background pixels)"


# ------------------------------------------------------------------------------------------------------------ mlflow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_ui_shows_a_tracked_run_with_its_loss_chart(tmp_path: Path) -> None:
    """A run as the tracking hook writes it (parameters, a per-step loss), shown by `mlflow ui` in Chromium:
    the run's name, its loss chart drawn, a non-blank screenshot."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no `chromium` on PATH (Debian: apt-get install -y chromium)")
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.pipeline import Pipeline
    from mlflow.tracking import MlflowClient

    from vit_pipelines.tracking import TrackWithMlflow

    hook = TrackWithMlflow()
    hook.settings, hook.project = {"enabled": True}, tmp_path
    catalog = DataCatalog({"parameters": MemoryDataset({"pretrain": {"train": {"lr": 0.001}}})})
    hook.before_pipeline_run({"pipeline_names": ["pretrain"]}, Pipeline([]), catalog)
    run_id = hook.run_id
    records = [{"step": s, "loss": 3.0 / s, "accuracy": 0.1 * s} for s in range(1, 9)]
    hook.after_dataset_saved("pretrain_history", {"records": records})
    hook.after_pipeline_run()
    store = f"sqlite:///{tmp_path / 'data' / '09_tracking' / 'mlflow.db'}"
    experiment = MlflowClient(store).get_run(run_id).info.experiment_id

    port = _free_port()
    server = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        run_api = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/get?run_id={run_id}"
        for _ in range(120):  # up, and answering the run page's first request
            try:
                with urllib.request.urlopen(run_api, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow ui did not answer within 60 s")
        screenshot, profile = tmp_path / "mlflow-run.png", tmp_path / "chromium-profile"
        page = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{run_id}/model-metrics"
        for _ in range(
            3
        ):  # the first load fetches and compiles the UI's scripts: the charts may still be loading
            cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                   f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars", "--virtual-time-budget=90000",
                   "--run-all-compositor-stages-before-draw",
                   f"--screenshot={screenshot}", "--dump-dom", page]  # fmt: skip
            result = _run(cmd, tmp_path, CHROMIUM_TIMEOUT_S)
            assert result.returncode == 0, result.stderr[-3000:]
            if "js-plotly-plot" in result.stdout:
                break
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    dom = result.stdout
    assert "pretrain" in dom and re.search(r">loss<", dom), dom[:2000]
    assert dom.count("js-plotly-plot") >= 2, "the run's metric charts were not drawn"  # loss and accuracy

    from PIL import Image

    with Image.open(screenshot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
    assert colours is not None and len(colours) > 200, "screenshot is (nearly) one colour"
