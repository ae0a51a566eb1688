"""`embedpipe report`: a job's run history as a table, JSON, and one self-contained HTML page,
loaded in a real headless Chromium (Debian's ``chromium``, driven by Playwright)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.cli import main
from pipeline.commands.history import run_history
from pipeline.commands.report_page import render_html
from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.outcome import EXIT_OK, EXIT_USAGE
from pipeline.sinks.lance import open_db
from tests.conftest import write_job

# A file name that would run or fetch something if the page did not escape it.
EVIL = "<img src=x onerror=alert(1)>.bin"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


def _cli(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": str(columns)})


@pytest.fixture(scope="module")
def history_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A job with three runs: a first one with a reject, one with changes, one with deletions
    and an empty file; the emulator answers some calls 429 so retries show."""
    folder = tmp_path_factory.mktemp("report")
    src = folder / "src"
    texts = make_text_corpus(src, 20)
    (src / EVIL).write_bytes(bytes(range(256)) * 8)
    with Emulator(EmulatorOptions(error_429=0.3, seed=7, latency_ms=5)) as emu:
        job = write_job(folder, src, embed={
            "provider": "gemini", "api_key": "any-key", "base_url": emu.base_url,
            "model": "gemini-embedding-2", "output_dimensionality": 128, "batch_size": 4,
            "mode": "interactive"})
        assert main(["run", "-q", str(job)]) == EXIT_OK
        for p in texts[:5]:
            p.write_text(p.read_text(encoding="utf-8") + " (revised)", encoding="utf-8")
        assert main(["run", "-q", str(job)]) == EXIT_OK  # the unchanged reject is not retried
        for p in texts[5:8]:
            p.unlink()
        (src / "blank.txt").write_bytes(b"")
        assert main(["run", "-q", str(job)]) == EXIT_OK
        yield job


def test_history_holds_each_runs_figures(history_job: Path):
    history = run_history(load_job(history_job))
    runs = history.runs
    assert [r["status"] for r in runs] == ["finished"] * 3
    assert [r["items_embedded"] for r in runs] == [20, 5, 0]
    assert runs[2]["files_deleted"] == 3
    assert runs[0]["reject_reasons"] == {"unsupported": 1} and runs[1]["reject_reasons"] == {}
    assert runs[2]["reject_reasons"] == {"empty": 1}
    assert sum(r["http_429"] for r in runs) > 0 and sum(r["retries"] for r in runs) > 0
    for run in runs[:2]:
        assert run["cost_usd"] > 0 and run["wall_s"] > 0
        assert 0 < run["latency_p50_s"] <= run["latency_p95_s"]
    assert runs[2]["latency_p50_s"] is None  # no call made: no latency, not a zero
    assert {r["reason"] for r in history.rejects} == {"unsupported", "empty"}
    assert history.rejects_total == 2


def test_report_json_parses_and_the_table_fits_80_columns(history_job: Path):
    done = _cli("report", str(history_job), "--json")
    assert done.returncode == EXIT_OK, done.stderr
    data = json.loads(done.stdout)
    assert len(data["runs"]) == 3 and data["rejects_total"] == 2
    done = _cli("report", str(history_job), columns=80)
    assert done.returncode == EXIT_OK, done.stderr
    assert max(len(line) for line in done.stdout.splitlines()) <= 80
    assert "rejected in these runs: " in done.stdout and "unsupported 1" in done.stdout
    done = _cli("report", str(history_job), "--last", "2", "--json")
    assert [r["items_embedded"] for r in json.loads(done.stdout)["runs"]] == [5, 0]


def test_report_before_any_run_is_a_usage_error(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 2)
    job = write_job(tmp_path, tmp_path / "src")
    done = _cli("report", str(job), "--html", str(tmp_path / "r.html"))
    assert done.returncode == EXIT_USAGE
    assert "has not run yet" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.html").exists()


def test_a_run_history_written_by_an_older_version_still_renders(tmp_path: Path):
    """Rows of the runs table from before the page's columns existed: their figures show as
    not recorded, wall time comes from start and end, and reading changes nothing."""
    make_text_corpus(tmp_path / "src", 2)
    job_path = write_job(tmp_path, tmp_path / "src")
    job = load_job(job_path)
    db = open_db(job.sink.state_uri)
    start = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)
    old = [{"run_id": f"r{i}", "job": "t", "started": start + timedelta(days=i),
            "finished": start + timedelta(days=i, seconds=90), "status": "finished",
            "exit_code": 0, "items_embedded": 10 * i, "rejects": 0, "http_429": 0,
            "retries": 0, "files_done": i} for i in range(3)]
    db.create_table(job.sink.runs_table, pa.Table.from_pylist(old))
    history = run_history(job)
    assert [r["wall_s"] for r in history.runs] == [90.0] * 3
    assert all(r["cost_usd"] is None and r["reject_reasons"] is None for r in history.runs)
    page = render_html(history, datetime.now(UTC))
    assert page.count('<svg class="chart"') == 6 and "not recorded for these runs" in page
    assert "cost_usd" not in db.open_table(job.sink.runs_table).schema.names


def _chromium() -> str:
    path = os.environ.get("EMBEDPIPE_CHROMIUM") or shutil.which("chromium")
    if path is None:
        if os.environ.get("EMBEDPIPE_REQUIRE_CHROMIUM"):
            pytest.fail("EMBEDPIPE_REQUIRE_CHROMIUM is set but no chromium is installed")
        pytest.skip("no headless Chromium here (Debian: apt-get install chromium; or set "
                    "EMBEDPIPE_CHROMIUM to a Chromium binary); CI installs it")
    return path


def test_the_html_page_renders_in_headless_chromium(history_job: Path, tmp_path: Path):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    page_path = tmp_path / "history.html"
    done = _cli("report", str(history_job), "--html", str(page_path))
    assert done.returncode == EXIT_OK, done.stderr
    messages: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: messages.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            charts = {c.get_attribute("id"): c for c in page.locator("svg.chart").all()}
            bars = {name: chart.locator("rect.bar").count() for name, chart in charts.items()}
            series = set(page.locator("#rejects rect.bar").evaluate_all(
                "bars => bars.map(b => b.dataset.series)"))
            boxes = [c.bounding_box() for c in charts.values()]
            run_rows = page.locator("table.runs tbody tr").count()
            reject_names = page.locator("table.rejects td.file").all_inner_texts()
            images = page.locator("img").count()
            page.screenshot(path=str(tmp_path / "history.png"), full_page=True)
        finally:
            browser.close()
    assert messages == []  # no console error, no warning, no script error
    assert requests == [page_path.as_uri()]  # nothing fetched: the page is self-contained
    assert set(charts) == {"items", "cost", "rejects", "latency", "throttling", "wall"}
    assert all(n > 0 for n in bars.values()), bars  # every chart has its bars drawn
    assert all(b is not None and b["width"] > 300 and b["height"] > 100 for b in boxes)
    assert series == {"unsupported", "empty"}
    assert run_rows == 3
    assert EVIL in reject_names and images == 0  # the name shown as text, never as markup
    assert (tmp_path / "history.png").stat().st_size > 10_000
