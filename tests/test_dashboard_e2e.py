"""End to end: `make dashboard`'s ZenML server, rendered by headless Chromium, shows a finished
run of each pipeline (training_pipeline, retrieval_pipeline): its DAG (every step and artifact
node, the edges between them) and the evaluation report's HTML visualisation. Clean copy and run machinery: tests/test_pipeline_e2e.py.

Needs Debian's chromium (``apt-get install -y chromium``). Screenshots land in tmp_path and, when
ECOMCAP_SCREENSHOTS is set, in that directory too.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.browser import Page, chromium_page
from tests.mlflow_ui import _free_port, ensure_chromium
from tests.test_pipeline_e2e import _write_config, repo, sh  # noqa: F401  (repo: the clean-copy fixture)

pytestmark = pytest.mark.e2e

TRAINING_NODES = ["ingest", "validate", "sft", "scst", "generate", "evaluate", "promote",
                  "train_data", "valid_data", "validation_report", "sft_model", "model", "caption_gen",
                  "evaluation", "gate_decision"]

RETRIEVAL_NODES = ["retrieval_ingest", "retrieval_validate", "retrieval_train", "embed_gallery", "retrieval_evaluate",
                   "retrieval_promote", "retrieval_train_data", "retrieval_valid_data", "retrieval_validation_report",
                   "retriever", "gallery", "retrieval_evaluation", "retrieval_gate_decision"]


def check_run_page(page: Page, run_url: str, nodes: list[str], report: str, report_text: str,
                   shots: Path, name: str) -> None:
    """The run page lists every node of the DAG and, opened from its node, the `report`
    artifact's Visualization tab renders an HTML preview containing `report_text`."""
    page.goto(run_url)
    node_names = "[...document.querySelectorAll('.react-flow__node')].map(n => n.innerText.split('\\n')[0].trim())"
    page.wait_for(f"{node_names}.length >= {len(nodes)}", f"the DAG's {len(nodes)} nodes", 90)
    shown = page.eval(node_names)
    assert sorted(shown) == sorted(nodes), shown
    edges = page.eval("document.querySelectorAll('.react-flow__edge').length")
    assert edges >= len(nodes) - 1, f"{edges} edges for {len(nodes)} nodes"
    page.screenshot(shots / f"{name}_dag.png")

    page.click_text(report, ".react-flow__node *")
    page.wait_for("document.body.innerText.includes('Materializer')", f"the {report} artifact sheet")
    page.click_text("Visualization", "[role=tab]")
    page.wait_for("document.body.innerText.includes('Load Preview')", "the HTML preview's consent button")
    page.click_text("Load Preview", "button")
    page.wait_for("document.querySelector('iframe[srcdoc]')", "the visualisation iframe")
    html = page.eval("document.querySelector('iframe[srcdoc]').srcdoc")
    assert report_text in html and "<img" in html, html[:1000]
    page.screenshot(shots / f"{name}_report.png")


def test_dashboard_shows_training_run_dag_and_report(repo, tmp_path):  # noqa: F811
    ensure_chromium()
    cfg = _write_config(repo, "dashboard.yaml", sft={"max_steps": 10, "eval_every": 0}, scst={"enabled": False})
    run = sh(repo, "bash scripts/run.sh", CONFIG=cfg)
    assert run.returncode == 0, run.stderr[-3000:]

    port = _free_port()
    # `-o .venv/.installed`: the copy shares this checkout's venv; never reinstall it from a test
    up = sh(repo, "make -o .venv/.installed dashboard", ZENML_DASHBOARD_PORT=str(port))
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        assert f"ZenML dashboard: http://127.0.0.1:{port}" in up.stdout
        url = re.search(r"last training_pipeline run \(completed\): (\S+)", up.stdout)
        assert url and url.group(1).startswith(f"http://127.0.0.1:{port}/projects/default/runs/"), up.stdout
        shots = tmp_path / "screenshots"
        with chromium_page() as page:
            check_run_page(page, url.group(1), TRAINING_NODES, "evaluation", "ecomcap validation samples",
                           shots, "training")
    finally:
        down = sh(repo, "make -o .venv/.installed dashboard-stop")
    assert down.returncode == 0 and "shut down" in down.stdout + down.stderr
    status = sh(repo, "zenml status")
    assert "local ZenML database" in status.stdout + status.stderr  # the client is back on SQLite

    dest = os.environ.get("ECOMCAP_SCREENSHOTS")
    for png in sorted(shots.glob("*.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        if dest:
            Path(dest).mkdir(parents=True, exist_ok=True)
            shutil.copy2(png, Path(dest) / png.name)


def test_dashboard_shows_retrieval_run_dag_and_report(repo, tmp_path):  # noqa: F811
    from tests.test_retrieval_pipeline_e2e import _config

    ensure_chromium()
    cfg = _config(repo)
    run = sh(repo, f"bash scripts/setup_stack.sh && zenml pipeline run pipelines.retrieval.retrieval_pipeline -c {cfg}",
             OMP_NUM_THREADS="1")
    assert run.returncode == 0, run.stderr[-3000:]
    port = _free_port()
    up = sh(repo, "make -o .venv/.installed dashboard", ZENML_DASHBOARD_PORT=str(port))
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        url = re.search(r"last retrieval_pipeline run \(completed\): (\S+)", up.stdout)
        assert url and url.group(1).startswith(f"http://127.0.0.1:{port}/projects/default/runs/"), up.stdout
        with chromium_page() as page:
            check_run_page(page, url.group(1), RETRIEVAL_NODES, "retrieval_evaluation", "MeanRecall",
                           tmp_path / "screenshots", "retrieval")
    finally:
        down = sh(repo, "make -o .venv/.installed dashboard-stop")
    assert down.returncode == 0 and "shut down" in down.stdout + down.stderr
