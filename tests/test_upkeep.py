"""Upkeep that never fails a night: run tags pruned so cleanup can work, compaction bounded on
disk, an upkeep failure after the commit a warning (never exit 3), and what status shows of the
table. Real runs against the emulator into real Lance tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lancedb
import pytest

from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.outcome import EXIT_OK
from pipeline.run import run_job
from tests.conftest import write_job


def _change(src: Path, night: int, share: float = 0.05) -> None:
    files = sorted(src.rglob("*.txt"))
    for i, path in enumerate(files[: max(1, int(len(files) * share))]):
        path.write_text(f"night {night}: a changed text number {i}\n", encoding="utf-8")


@pytest.mark.slow
def test_thirty_nights_with_compaction_stay_green_and_bounded_on_disk(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 200)
    # keep_days this short is what seven days are to a nightly job after a week: every tag but
    # the newest is older than it, which made Lance refuse every cleanup (exit 3) before.
    job = load_job(write_job(tmp_path, src, extra={"run": {
        "compact": True, "keep_versions": 3, "keep_days": 1e-6}}))
    for night in range(30):
        if night:
            _change(src, night)
        result = run_job(job)
        assert result.exit_code == EXIT_OK, (night, result.problems)
        assert result.stats.upkeep_warnings == [], (night, result.stats.upkeep_warnings)
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", "--json",
                             str(tmp_path / "job.yaml")], capture_output=True, text=True,
                            check=True)
    table = json.loads(status.stdout)["table"]
    assert table["rows"] == 200 and table["fragments"] <= 2 and table["tags"] <= 3
    assert table["disk_bytes"] <= 3 * table["live_bytes"], table
    runs = lancedb.connect(str(tmp_path / "lance")).open_table("runs").to_arrow()
    assert set(runs["exit_code"].to_pylist()) == {EXIT_OK}


def test_run_tags_beyond_keep_versions_are_pruned_and_the_users_are_kept(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 20)
    job = load_job(write_job(tmp_path, src, extra={"run": {"keep_versions": 2}}))
    run_job(job)
    table = lancedb.connect(str(tmp_path / "lance")).open_table("vectors")
    table.tags.create("release-1", table.version)
    for night in range(1, 5):
        _change(src, night, 0.2)
        assert run_job(job).exit_code == EXIT_OK
    tags = table.tags.list()
    assert "release-1" in tags
    assert len([t for t in tags if t.startswith("run-")]) == 2


def test_an_upkeep_failure_after_the_commit_is_a_warning_not_a_failed_night(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pipeline.errors import SinkError
    from pipeline.sinks.lance import LanceSink

    def refuse(*args: object, **kwargs: object) -> list[str]:
        raise SinkError("table upkeep failed: 31 tagged version(s) have been marked for cleanup")

    monkeypatch.setattr(LanceSink, "upkeep", refuse)
    src = tmp_path / "src"
    make_text_corpus(src, 10)
    result = run_job(load_job(write_job(tmp_path, src, extra={"run": {"compact": True}})))
    assert result.exit_code == EXIT_OK
    assert result.report["upkeep_warnings"] and result.report["status"] == "finished"
    runs = lancedb.connect(str(tmp_path / "lance")).open_table("runs").to_arrow().to_pylist()
    assert [r["status"] for r in runs] == ["finished"]
    assert (tmp_path / "lance" / "reports" / f"{result.stats.run_id}.json").is_file()


def test_flush_interval_is_a_maximum_age_under_a_steady_trickle(tmp_path: Path):
    from pipeline.emulator.server import Emulator, EmulatorOptions

    src = tmp_path / "src"
    make_text_corpus(src, 16)
    with Emulator(EmulatorOptions(latency_ms=300)) as emu:  # a row every 0.3 s: never idle
        job = write_job(tmp_path, src, embed={
            "provider": "gemini", "api_key": "k", "base_url": emu.base_url,
            "model": "gemini-embedding-2", "output_dimensionality": 128, "batch_size": 1,
            "concurrency": 1, "mode": "interactive"}, extra={"run": {"flush_interval_s": 1.0}})
        assert run_job(load_job(job)).exit_code == EXIT_OK
    table = lancedb.connect(str(tmp_path / "lance")).open_table("vectors")
    # ~5 s of rows committed at least once a second (an idle timer committed once, at the end)
    assert len(table.list_versions()) >= 4
