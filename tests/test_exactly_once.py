"""Exactly once: a run killed at any moment (SIGKILL) continues where it stopped, with no
duplicate and no lost row, and pays again only for what was in flight."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lancedb
import polars as pl
import pytest

from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.run import EXIT_OK, run_job
from tests.conftest import copy_corpus_files, write_job

FILES = 5000
KILLS = 10
FLUSH_ROWS = 200
BATCH = 20
CONCURRENCY = 2


def _run_cli(job: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-q", str(job)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_items(emu: Emulator, proc: subprocess.Popen[bytes], served: int) -> None:
    deadline = time.monotonic() + 120
    while emu.state.stats.items < served and proc.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)


@pytest.mark.slow
def test_ten_sigkills_then_finish_leaves_exactly_one_row_per_item(tmp_path: Path,
                                                                  corpus_dir: Path):
    src = tmp_path / "src"
    make_text_corpus(src, FILES)
    copy_corpus_files(corpus_dir, ["pdf/tracemonkey.pdf"], src)  # 3 parts, across flushes
    expected_items = FILES + 3
    rng = random.Random(20261122)
    with Emulator(EmulatorOptions(latency_ms=50, per_item_ms=2)) as emu:
        job = write_job(tmp_path, src, embed={
            "provider": "gemini", "api_key": "any-key",
            "base_url": emu.base_url, "model": "gemini-embedding-2",
            "output_dimensionality": 128, "batch_size": BATCH, "concurrency": CONCURRENCY,
            "mode": "interactive"},  # this harness kills interactive runs; batch mode has its own
            extra={"run": {"flush_rows": FLUSH_ROWS, "flush_interval_s": 0.5}})
        killed_mid_run = 0
        for kill in range(KILLS):
            proc = _run_cli(job)
            if kill % 4 == 0:
                # During start-up: the run cannot have finished (5,003 items at ~400/s).
                time.sleep(rng.uniform(0.2, 1.0))
            else:
                # Mid-run, at a moment measured from the run itself: after it has been served
                # a random number of items. Each kill leaves most of the corpus undone, so no
                # kill can land after the run finished.
                _wait_for_items(emu, proc, emu.state.stats.items + rng.randint(20, 300))
            assert proc.poll() is None, f"run {kill} ended before its kill: {proc.returncode}"
            proc.send_signal(signal.SIGKILL)
            killed_mid_run += 1
            proc.wait(timeout=30)
        final = _run_cli(job)
        _, err = final.communicate(timeout=300)
        assert final.returncode == EXIT_OK, err.decode()[-2000:]
        served = emu.state.stats.items

    assert killed_mid_run == KILLS
    db = lancedb.connect(str(tmp_path / "lance"))
    rows = pl.from_arrow(db.open_table("vectors").to_arrow().select(["id", "key", "part"]))
    assert isinstance(rows, pl.DataFrame)
    assert rows.height == expected_items
    assert rows["id"].n_unique() == rows.height
    assert rows.filter(pl.col("key") == "pdf/tracemonkey.pdf")["part"].sort().to_list() == [0, 1, 2]
    files = pl.from_arrow(db.open_table("files").to_arrow())
    assert isinstance(files, pl.DataFrame)
    assert files.height == FILES + 1 and set(files["status"]) == {"embedded"}
    # Paid again only for what was in flight at each kill: unflushed rows and calls under way.
    in_flight = FLUSH_ROWS * 2 + BATCH * (CONCURRENCY + 4)
    assert served <= expected_items + killed_mid_run * in_flight, served
    runs = pl.from_arrow(db.open_table("runs").to_arrow())
    assert isinstance(runs, pl.DataFrame)
    # Kills during start-up land before a run is recorded; every recorded run but the last
    # was killed, and the next run found it and marked it.
    statuses = runs.sort("started")["status"].to_list()
    assert statuses[-1] == "finished" and set(statuses[:-1]) == {"interrupted"}
    assert 1 <= len(statuses) - 1 <= killed_mid_run


def test_unchanged_files_cost_no_call_and_no_read(tmp_path: Path, emulator: Emulator,
                                                  monkeypatch: pytest.MonkeyPatch):
    from connectors.local import LocalConnector

    make_text_corpus(tmp_path / "src", 300)
    job = write_job(tmp_path, tmp_path / "src", embed={
        "provider": "gemini", "api_key": "any-key",
        "base_url": emulator.base_url, "model": "gemini-embedding-2",
        "output_dimensionality": 128})
    assert run_job(load_job(job)).stats.items_embedded == 300
    calls_before = emulator.state.stats.http_requests

    def no_read(self, obj):  # type: ignore[no-untyped-def]
        raise AssertionError(f"{obj.key} was read")

    monkeypatch.setattr(LocalConnector, "read", no_read)
    monkeypatch.setattr(LocalConnector, "fetch", no_read)
    again = run_job(load_job(job))
    assert again.exit_code == EXIT_OK and again.stats.files_unchanged == 300
    assert emulator.state.stats.http_requests == calls_before


def test_fingerprint_change_re_embeds_and_replaces(tmp_path: Path, corpus_dir: Path):
    src = tmp_path / "src"
    copy_corpus_files(corpus_dir, ["pdf/tracemonkey.pdf"], src)
    job = write_job(tmp_path, src)
    run_job(load_job(job))
    job = write_job(tmp_path, src, extra={"validate": {"pdf_max_pages": 4}})
    result = run_job(load_job(job))
    assert result.stats.files_changed == 1 and result.stats.items_embedded == 4
    rows = lancedb.connect(str(tmp_path / "lance")).open_table("vectors").to_arrow()
    spans = sorted(zip(rows["page_start"].to_pylist(), rows["page_end"].to_pylist(), strict=True))
    assert spans == [(1, 4), (5, 8), (9, 12), (13, 14)]  # the 6-page parts are gone


def test_rejects_retry_only_when_changed_or_asked(tmp_path: Path, corpus_dir: Path):
    src = tmp_path / "src"
    copy_corpus_files(corpus_dir, ["bad/broken.png"], src)
    job = write_job(tmp_path, src)
    assert run_job(load_job(job)).stats.rejects == 1
    assert run_job(load_job(job)).stats.files_unchanged == 1
    assert run_job(load_job(job), retry_rejects=True).stats.rejects == 1
    copy_corpus_files(corpus_dir, ["image/smile.png"], tmp_path / "other")
    (src / "bad" / "broken.png").write_bytes((tmp_path / "other/image/smile.png").read_bytes())
    fixed = run_job(load_job(job))
    assert fixed.stats.files_changed == 1 and fixed.stats.items_embedded == 1
    db = lancedb.connect(str(tmp_path / "lance"))
    assert db.open_table("rejects").count_rows() == 0  # the old reject went with the old version


def test_each_run_is_tagged_and_can_be_checked_out(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 20)
    job = write_job(tmp_path, tmp_path / "src")
    first = run_job(load_job(job))
    make_text_corpus(tmp_path / "src" / "more", 5, seed=99)
    run_job(load_job(job))
    table = lancedb.connect(str(tmp_path / "lance")).open_table("vectors")
    assert table.count_rows() == 25
    table.checkout(f"run-{first.stats.run_id}")
    assert table.count_rows() == 20


def test_keep_on_delete_and_upkeep(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 300)
    job = write_job(tmp_path, tmp_path / "src", extra={"run": {
        "on_delete": "keep", "compact": True, "index_min_rows": 256}})
    run_job(load_job(job))
    for p in list((tmp_path / "src").rglob("*.txt"))[:10]:
        p.unlink()
    result = run_job(load_job(job))
    assert result.stats.files_deleted == 0
    table = lancedb.connect(str(tmp_path / "lance")).open_table("vectors")
    assert table.count_rows() == 300
    assert any("vector" in (i.columns or []) for i in table.list_indices())


def test_id_index_is_built_kept_and_rebuilt_when_stale(tmp_path: Path):
    """Flushes merge on id and look up changed files' rows by uri, and the manifest merges on
    uri: past run.id_index_min_rows those columns get BTREE indexes, and merges stay exact with
    them (a changed file replaces its row, no duplicate)."""
    src = tmp_path / "src"
    make_text_corpus(src, 100)
    job = write_job(tmp_path, src, extra={"run": {"id_index_min_rows": 50}})
    run_job(load_job(job))
    table = lancedb.connect(str(tmp_path / "lance")).open_table("vectors")
    (index,) = [i for i in table.list_indices() if i.columns == ["id"]]
    assert table.index_stats(index.name).num_unindexed_rows == 0
    assert [i.columns for i in table.list_indices() if i.columns == ["uri"]] == [["uri"]]
    manifest = lancedb.connect(str(tmp_path / "lance")).open_table("files")
    assert [i.columns for i in manifest.list_indices()] == [["uri"]]
    files = sorted(src.rglob("*.txt"))
    files[0].write_text("A changed note about lighthouses.")
    for i in range(30):  # 30 new rows: more than a fifth of the table is not in the index
        (src / f"new-{i}.txt").write_text(f"new note {i} about tides")
    result = run_job(load_job(job))
    assert result.stats.items_embedded == 31 and result.stats.files_changed == 1
    table = lancedb.connect(str(tmp_path / "lance")).open_table("vectors")
    ids = table.to_arrow()["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 130
    manifest = lancedb.connect(str(tmp_path / "lance")).open_table("files")
    assert manifest.count_rows() == 130 and manifest.count_rows("uri LIKE '%new-7.txt'") == 1
    (index,) = [i for i in table.list_indices() if i.columns == ["id"]]
    assert table.index_stats(index.name).num_unindexed_rows == 0  # rebuilt


def test_an_unreadable_file_is_tried_again_next_run(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    from connectors.local import LocalConnector
    from pipeline.errors import ConnectorError

    make_text_corpus(tmp_path / "src", 5)
    job = write_job(tmp_path, tmp_path / "src")
    real_fetch = LocalConnector.fetch

    def flaky(self, obj):  # type: ignore[no-untyped-def]
        if obj.key.endswith("0000003.txt"):
            raise ConnectorError(f"{obj.key}: cannot read: Input/output error", uri=obj.uri)
        return real_fetch(self, obj)

    with monkeypatch.context() as m:
        m.setattr(LocalConnector, "fetch", flaky)
        first = run_job(load_job(job))
    assert first.stats.reject_reasons == {"unreadable": 1} and first.stats.items_embedded == 4
    second = run_job(load_job(job))
    assert second.stats.items_embedded == 1 and second.stats.rejects == 0
    db = lancedb.connect(str(tmp_path / "lance"))
    assert db.open_table("vectors").count_rows() == 5
    assert db.open_table("rejects").count_rows() == 0
