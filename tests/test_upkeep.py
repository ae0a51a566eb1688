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


def _fragments(table: object) -> int:
    return int(table.stats()["fragment_stats"]["num_fragments"])  # type: ignore[attr-defined]


def test_the_jobs_own_tables_are_compacted_once_fragments_pile_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import pipeline.state.upkeep as upkeep

    monkeypatch.setattr(upkeep, "SMALL_FRAGMENTS", 4)  # 32 and 64: too many nights for a test
    monkeypatch.setattr(upkeep, "VERSIONS", 5)
    src = tmp_path / "src"
    make_text_corpus(src, 20)
    blobs = [src / f"blob{i}.bin" for i in range(4)]  # unsupported: a reject row each
    # run.compact stays off: it is about the vectors table, the user's; not the job's own tables
    job = load_job(write_job(tmp_path, src, extra={"run": {"keep_days": 1e-6}}))
    db = lancedb.connect(str(tmp_path / "lance"))
    compacted = 0
    for night in range(8):
        if night:
            _change(src, night, 0.1)
        for i, blob in enumerate(blobs):
            blob.write_bytes(bytes([0, 159, 146, 150, night, i]) * 40)
        result = run_job(job)
        assert result.exit_code == EXIT_OK and result.stats.upkeep_warnings == []
        files, rejects = db.open_table("files"), db.open_table("rejects")
        for table in (files, rejects, db.open_table("runs")):
            assert upkeep.small_fragments(table) < 4 and len(table.list_versions()) < 5, night
        # merged into one fragment, and the versions before the one compacted removed
        compacted += _fragments(files) == 1 and len(files.list_versions()) <= 2
    assert compacted >= 2
    assert files.count_rows() == 24 and rejects.count_rows() == 4
    assert len(db.open_table("vectors").list_versions()) >= 8  # run.compact is off: all kept
    again = run_job(job)  # the compacted manifest is what the next night diffs against
    assert again.exit_code == EXIT_OK
    assert again.stats.files_unchanged == 24 and again.stats.files_new == 0


def test_a_failed_state_upkeep_is_a_warning_and_the_run_is_still_tagged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import pipeline.state.upkeep as upkeep

    def broken(table: object) -> int:
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(upkeep, "small_fragments", broken)
    src = tmp_path / "src"
    make_text_corpus(src, 10)
    result = run_job(load_job(write_job(tmp_path, src)))
    assert result.exit_code == EXIT_OK and result.report["status"] == "finished"
    assert any("state table upkeep failed" in w and "disk quota exceeded" in w
               for w in result.report["upkeep_warnings"]), result.report["upkeep_warnings"]
    table = lancedb.connect(str(tmp_path / "lance")).open_table("vectors")
    assert f"run-{result.stats.run_id}" in table.tags.list()
