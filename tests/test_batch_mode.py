"""Batch API mode end to end: real runs (in process and as CLI processes killed with SIGKILL)
against the emulator's Batch and Files APIs, real Lance tables."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import lancedb
import pytest

from pipeline.commands.sample_files import make_quickstart_media, make_text_corpus
from pipeline.config import JobConfig, load_job
from pipeline.emulator.checks import ApiFault
from pipeline.emulator.files import FileStore
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.gemini.batches import BatchApi
from pipeline.outcome import EXIT_FAILED, EXIT_OK, EXIT_PENDING
from pipeline.run import run_job
from pipeline.state.batches import BatchLog
from tests.conftest import write_job

FAST_POLL = {"poll_initial_s": 0.1, "poll_max_s": 0.5}


def _embed(emu: Emulator, **extra: Any) -> dict[str, Any]:
    return {"provider": "gemini", "api_key": "k", "base_url": emu.base_url,
            "model": "gemini-embedding-2", "output_dimensionality": 128,
            "mode": "batch", "batch": FAST_POLL, **extra}


def _ids(tmp_path: Path) -> list[str]:
    table = lancedb.connect(str(tmp_path / "lance")).open_table("vectors")
    return table.to_arrow()["id"].to_pylist()


def _cli(job: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-q", *args, str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_batch_mode_embeds_every_item_once_at_half_the_interactive_cost(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 300)
    make_quickstart_media(src / "media")  # a 9-page PDF (2 parts) and two images
    with Emulator(EmulatorOptions(batch_delay_s=0.2)) as emu:
        batch = run_job(load_job(write_job(tmp_path, src, embed=_embed(
            emu, batch={**FAST_POLL, "max_requests": 120}))))
        assert emu.state.stats.items == 0  # nothing through the interactive endpoint
        assert emu.state.stats.batch_items == 304 and emu.state.stats.batch_jobs == 3
        interactive = run_job(load_job(write_job(tmp_path / "i", src, embed=_embed(
            emu, mode="interactive"))))
    assert batch.exit_code == EXIT_OK and batch.stats.items_batch == 304
    assert interactive.stats.items_embedded == 304 and interactive.stats.items_batch == 0
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 304
    reports = [json.loads(next((root / "lance" / "reports").glob("*.json")).read_text())
               for root in (tmp_path, tmp_path / "i")]
    # Batch results carry no usageMetadata: their tokens are the validator's estimates, which
    # are within 10 % of what the service counts (tests/test_operations.py).
    assert reports[0]["cost_usd"] == pytest.approx(reports[1]["cost_usd"] / 2, rel=0.1)


def test_jobs_finished_while_others_are_filled_are_collected_meanwhile(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A backfill does not hold every item until its last job is submitted: a job that has
    finished is collected (its items let go) while later jobs are still being filled."""
    src = tmp_path / "src"
    make_text_corpus(src, 300)
    caplog.set_level("INFO", logger="embedpipe.batch")
    with Emulator(EmulatorOptions(batch_delay_s=0)) as emu:
        result = run_job(load_job(write_job(tmp_path, src, embed=_embed(
            emu, batch={"poll_initial_s": 0.001, "poll_max_s": 0.002, "max_requests": 25}))))
        assert emu.state.stats.batch_jobs == 12
    assert result.exit_code == EXIT_OK and result.stats.items_batch == 300
    events = [r.getMessage().split()[0] for r in caplog.records
              if r.getMessage().startswith(("submitted", "collected"))]
    assert events.count("submitted") == events.count("collected") == 12
    last_submitted = len(events) - 1 - events[::-1].index("submitted")
    assert events.index("collected") < last_submitted
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 300
    stats = result.stats
    assert stats.batch_prepare_s > 0 and stats.batch_upload_s > 0 and stats.batch_collect_s > 0


@pytest.mark.parametrize(("max_held_bytes", "most_open"), [(1, 1), (2 * 25 * 2400, 2)])
def test_a_backfill_holds_no_more_than_max_held_bytes_while_jobs_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, max_held_bytes: int, most_open: int):
    """Jobs that take their time: the run fills no more jobs while those submitted hold
    ``max_held_bytes`` (each of these holds 25 items of ~2.7 kB), waits for one to finish,
    collects it, and goes on; every item is written once."""
    src = tmp_path / "src"
    make_text_corpus(src, 300)
    caplog.set_level("INFO", logger="embedpipe.batch")
    with Emulator(EmulatorOptions(batch_delay_s=0.3)) as emu:
        result = run_job(load_job(write_job(tmp_path, src, embed=_embed(
            emu, batch={**FAST_POLL, "max_requests": 25, "max_held_bytes": max_held_bytes}))))
        assert emu.state.stats.batch_jobs == 12 and emu.state.stats.items == 0
    assert result.exit_code == EXIT_OK and result.stats.items_batch == 300
    events = [r.getMessage().split()[0] for r in caplog.records
              if r.getMessage().startswith(("submitted", "collected"))]
    assert events.count("submitted") == events.count("collected") == 12
    open_jobs = [events[:i + 1].count("submitted") - events[:i + 1].count("collected")
                 for i in range(len(events))]
    assert max(open_jobs) <= most_open
    if most_open == 1:  # every job holds more than that: the run waited, and said so
        assert any("waiting for jobs to finish" in r.getMessage() for r in caplog.records)
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 300


def test_a_job_is_filled_while_the_one_before_it_is_uploaded(tmp_path: Path):
    """Over a slow link (the emulator takes uploads in at 0.5 MB/s), each job's input is on
    the wire while the routing fills the next: the routing waits only when the next job is
    full before the last one is submitted, never for a whole upload of its own, and every item
    is written once."""
    src = tmp_path / "src"
    make_text_corpus(src, 300)
    with Emulator(EmulatorOptions(batch_delay_s=0.05, upload_mb_per_s=0.5)) as emu:
        result = run_job(load_job(write_job(tmp_path, src, embed=_embed(
            emu, batch={**FAST_POLL, "max_requests": 50, "max_inline_bytes": 1024}))))
        assert all(j.input_file is not None for j in emu.state.batches.jobs.values())
    stats = result.stats
    assert result.exit_code == EXIT_OK and stats.items_batch == 300 and stats.batch_jobs == 6
    # a hand-over waits at most for the upload before it, and the last upload for none
    assert 0 < stats.batch_upload_wait_s < stats.batch_upload_s
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 300


def test_jobs_are_filled_and_submitted_while_a_finished_one_is_collected(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A finished job's results are downloaded by a task of their own: the routing goes on
    filling and submitting jobs meanwhile. Here the first download does not begin until all 6
    jobs of the run are created; were the routing collecting itself, it would stop at that
    download, the other jobs would never be filled, and the run would fail. Every item is
    written once."""
    src = tmp_path / "src"
    make_text_corpus(src, 300)
    created: list[str] = []
    create, results = BatchApi.create, BatchApi.results

    async def counted(self: BatchApi, **kwargs: Any) -> Any:
        job = await create(self, **kwargs)
        created.append(job.name)
        return job

    async def after_every_job(self: BatchApi, job: Any) -> AsyncIterator[Any]:
        with anyio.fail_after(60):  # no job filled while a download waits: fail, not hang
            while len(created) < 6:
                await anyio.sleep(0.01)
        async for result in results(self, job):
            yield result

    monkeypatch.setattr(BatchApi, "create", counted)
    monkeypatch.setattr(BatchApi, "results", after_every_job)
    with Emulator(EmulatorOptions(batch_delay_s=0)) as emu:
        result = run_job(load_job(write_job(tmp_path, src, embed=_embed(
            emu, batch={"poll_initial_s": 0.01, "poll_max_s": 0.05, "max_requests": 50,
                        "max_inline_bytes": 1024}))))
    stats = result.stats
    assert result.exit_code == EXIT_OK, result.problems
    assert len(created) == stats.batch_jobs == 6 and stats.items_batch == 300
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 300


@pytest.mark.parametrize("at_once", [1, 3])
def test_finished_jobs_results_are_downloaded_max_downloads_at_a_time(tmp_path: Path,
                                                                        at_once: int):
    """Six file jobs, all finished when first looked at, their results sent at a slow link's
    pace (~0.4 s each): ``max_downloads`` of them come down at once, never more, and every
    item is written once."""
    src = tmp_path / "src"
    make_text_corpus(src, 300)
    with Emulator(EmulatorOptions(batch_delay_s=0.05, download_mb_per_s=0.2)) as emu:
        result = run_job(load_job(write_job(tmp_path, src, embed=_embed(
            emu, batch={"poll_initial_s": 1.5, "poll_max_s": 1.5, "max_requests": 50,
                        "max_inline_bytes": 1024, "max_downloads": at_once}))))
        usage = emu.state.files.usage()
        assert emu.state.stats.batch_jobs == 6
    assert result.exit_code == EXIT_OK and result.stats.items_batch == 300
    assert usage["downloads_peak"] == at_once
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 300


def test_a_backfill_deletes_a_jobs_files_from_the_service_once_its_rows_are_committed(
        tmp_path: Path):
    """Google keeps a project's files (20 GB at most) for 48 h: a backfill that left each job's
    input and responses there would have its uploads refused before it ended. 12 file jobs,
    one open at a time, rows committed 25 at a time: the files of a job are deleted once its
    rows are committed, while the run goes on, and none is left at the end."""
    src = tmp_path / "src"
    make_text_corpus(src, 300)
    with Emulator(EmulatorOptions(batch_delay_s=0.05)) as emu:
        result = run_job(load_job(write_job(tmp_path, src, embed=_embed(
            emu, batch={**FAST_POLL, "max_requests": 25, "max_inline_bytes": 1024,
                        "max_held_bytes": 1}), extra={"run": {"flush_rows": 25}})))
        usage = emu.state.files.usage()
        assert emu.state.stats.batch_jobs == 12
        assert all(j.input_file is not None for j in emu.state.batches.jobs.values())
    assert result.exit_code == EXIT_OK and result.stats.items_batch == 300
    assert result.stats.batch_files_released == 12
    assert usage["files"] == 0 and usage["files_bytes"] == 0
    # 24 files were given (an input and a responses file a job); at most a few jobs' at once
    assert 0 < usage["files_peak_bytes"] <= usage["files_total_bytes"] / 3
    rows = BatchLog(lancedb.connect(str(tmp_path / "lance"))).all()
    assert [r["files_released"] for r in rows] == [True] * 12
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 300


def test_files_the_service_will_not_delete_are_a_warning_and_the_next_run_deletes_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A service that refuses to delete files (here: 405, as from a proxy that does not pass
    DELETE) costs neither a result nor the run: the run ends 0 with an upkeep warning, the
    batch log says the files are still there, and the next run deletes them."""
    refuse = True
    serve = FileStore.file

    async def file(self: FileStore, request: Any) -> Any:
        if request.method == "DELETE" and refuse:
            raise ApiFault(405, "METHOD_NOT_ALLOWED", "Method not allowed.")
        return await serve(self, request)

    monkeypatch.setattr(FileStore, "file", file)
    src = tmp_path / "src"
    make_text_corpus(src, 100)
    with Emulator(EmulatorOptions(batch_delay_s=0)) as emu:
        job = load_job(write_job(tmp_path, src, embed=_embed(
            emu, batch={**FAST_POLL, "max_requests": 50, "max_inline_bytes": 1024})))
        first = run_job(job)
        kept = emu.state.files.usage()["files"]
        refuse = False
        second = run_job(job)
        left = emu.state.files.usage()["files"]
    assert first.exit_code == EXIT_OK and first.stats.items_batch == 100
    assert first.stats.batch_files_released == 0 and kept == 4  # two inputs, two responses
    assert [w for w in first.stats.upkeep_warnings if "could not delete the files" in w]
    assert second.exit_code == EXIT_OK and second.stats.items_batch == 0
    assert second.stats.batch_files_released == 2 and left == 0
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 100


@pytest.mark.parametrize(("max_inline_bytes", "uploaded"), [(20_000_000, 0), (100_000, 3)])
def test_a_job_goes_inline_only_when_its_answer_is_small_too(
        tmp_path: Path, max_inline_bytes: int, uploaded: int):
    """300 texts of 128 dimensions: a few kB of requests, ~480 kB of answer. Inline under a
    20 MB limit; under a 100 kB one the results would come back in one answer too large for
    it: file jobs, whose results are streamed."""
    src = tmp_path / "src"
    make_text_corpus(src, 300)
    with Emulator(EmulatorOptions(batch_delay_s=0)) as emu:
        result = run_job(load_job(write_job(tmp_path, src, embed=_embed(
            emu, batch={**FAST_POLL, "max_requests": 100,
                        "max_inline_bytes": max_inline_bytes}))))
        by_file = [j for j in emu.state.batches.jobs.values() if j.input_file is not None]
        assert emu.state.stats.batch_jobs == 3
    assert result.exit_code == EXIT_OK and result.stats.items_batch == 300
    assert len(by_file) == uploaded
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 300


def test_auto_mode_uses_the_batch_api_only_for_a_large_run(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 30)
    with Emulator(EmulatorOptions(batch_delay_s=0.1)) as emu:
        small = run_job(load_job(write_job(tmp_path / "a", tmp_path / "src", embed=_embed(
            emu, mode="auto", batch_min_items=100))))
        assert emu.state.stats.batch_jobs == 0 and small.stats.items_embedded == 30
        large = run_job(load_job(write_job(tmp_path / "b", tmp_path / "src", embed=_embed(
            emu, mode="auto", batch_min_items=10))))
        assert emu.state.stats.batch_jobs == 1 and large.stats.items_batch == 30


def test_a_run_killed_after_submitting_pays_nothing_twice(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 250)
    with Emulator(EmulatorOptions(batch_delay_s=4.0)) as emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_embed(
            emu, batch={**FAST_POLL, "max_requests": 100}))
        proc = _cli(job)
        deadline = time.monotonic() + 60
        while emu.state.stats.batch_jobs < 3:  # every job submitted, none finished
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        again = _cli(job)
        _, err = again.communicate(timeout=120)
        assert again.returncode == EXIT_OK, err
        assert emu.state.stats.batch_jobs == 3  # the next run submitted nothing new
        assert emu.state.stats.batch_items == 250 and emu.state.stats.items == 0
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 250


def test_detach_exits_pending_and_the_next_run_collects(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 40)
    with Emulator(EmulatorOptions(batch_delay_s=1.0)) as emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_embed(emu))
        detached = _cli(job, "--detach")
        _, err = detached.communicate(timeout=60)
        assert detached.returncode == EXIT_PENDING, err
        listing = subprocess.run([sys.executable, "-m", "pipeline.cli", "batches", "--json",
                                  str(job)], capture_output=True, text=True, timeout=60)
        (row,) = json.loads(listing.stdout)
        assert row["status"] == "pending" and row["items"] == 40
        time.sleep(1.2)
        collected = _cli(job)
        _, err = collected.communicate(timeout=60)
        assert collected.returncode == EXIT_OK, err
        assert emu.state.stats.batch_jobs == 1 and len(_ids(tmp_path)) == 40


def test_a_resumed_backfill_collects_each_earlier_job_once_its_items_are_validated(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """The run after a detached (or killed) backfill validates the files again: the items of
    an earlier job go to it as soon as they have all come, not when the last file is done, so
    they count against ``max_held_bytes`` and the job is collected while validation goes on
    (a 10M-item backfill resumed would otherwise hold every item until the end)."""
    src = tmp_path / "src"
    make_text_corpus(src, 300)
    with Emulator(EmulatorOptions(batch_delay_s=2)) as emu:  # none finished while submitting
        def job(max_held_bytes: int) -> JobConfig:
            return load_job(write_job(tmp_path, src, embed=_embed(emu, batch={
                **FAST_POLL, "max_requests": 25, "max_held_bytes": max_held_bytes})))

        detached = run_job(job(512_000_000), detach=True)
        assert detached.exit_code == EXIT_PENDING and detached.stats.batch_jobs == 12
        caplog.set_level("INFO", logger="embedpipe.batch")
        resumed = run_job(job(1))  # one job's items held at a time
        assert emu.state.stats.batch_jobs == 12  # nothing submitted twice
    assert resumed.exit_code == EXIT_OK
    assert resumed.stats.items_batch_awaited == 300 and resumed.stats.batch_jobs == 0
    messages = [r.getMessage() for r in caplog.records]
    # no job is submitted in this run: only jobs handed over early hold items before the end
    assert any("waiting for jobs to finish" in m for m in messages)
    assert sum(m.startswith("collected") for m in messages) == 12
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids)) == 300


def test_a_failed_job_falls_back_to_interactive_in_the_same_run(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 20)
    make_quickstart_media(src / "media")  # 2 PDF parts and 2 images: their bytes went away
    with Emulator(EmulatorOptions(batch_delay_s=0.1, batch_outcome="fail")) as emu:
        failed = run_job(load_job(write_job(tmp_path, src, embed=_embed(emu))))
        # all of it interactively, in the same run: the texts at hand, the media read again
        assert emu.state.stats.items == 24
    assert failed.exit_code == EXIT_OK, failed.problems
    assert failed.stats.items_batch_failed == 24 and failed.stats.items_embedded == 24
    assert any("20 of its 24 items embedded interactively now" in p
               for p in failed.problems), failed.problems
    assert len(_ids(tmp_path)) == 24


def test_a_failed_job_is_submitted_again_by_the_next_run(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 20)
    with Emulator(EmulatorOptions(batch_delay_s=0.1, batch_outcome="fail")) as emu:
        failed = run_job(load_job(write_job(tmp_path, tmp_path / "src", embed=_embed(
            emu, batch={**FAST_POLL, "fallback": "next_run"}))))
    assert failed.exit_code == EXIT_FAILED and failed.stats.items_batch_failed == 20
    assert any("ended BATCH_STATE_FAILED" in p for p in failed.problems)
    with Emulator(EmulatorOptions(batch_delay_s=0.1)) as emu:
        again = run_job(load_job(write_job(tmp_path, tmp_path / "src", embed=_embed(emu))))
        assert emu.state.stats.batch_items == 20
    assert again.exit_code == EXIT_OK and len(_ids(tmp_path)) == 20


def test_transient_request_errors_of_media_converge_in_one_run(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 60)
    make_quickstart_media(src / "media")
    with Emulator(EmulatorOptions(batch_delay_s=0.1, batch_error_rate=0.2, seed=11)) as emu:
        result = run_job(load_job(write_job(tmp_path, src, embed=_embed(emu))))
    assert result.exit_code == EXIT_OK, result.problems
    assert result.stats.items_fallback > 0  # some failed in the job, every one stored now
    assert len(set(_ids(tmp_path))) == len(_ids(tmp_path)) == 64


def test_transient_request_errors_and_excluded_modalities_go_interactive(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 60)
    make_quickstart_media(src / "media")
    with Emulator(EmulatorOptions(batch_delay_s=0.1, batch_error_rate=0.2, seed=5)) as emu:
        result = run_job(load_job(write_job(tmp_path, src, embed=_embed(
            emu, batch={**FAST_POLL, "modalities": ["text"]}))))
        interactive_items = emu.state.stats.items
    assert result.exit_code == EXIT_OK
    assert len(set(_ids(tmp_path))) == len(_ids(tmp_path)) == 64
    # 4 media items by modality, about 12 texts by injected 503s, all embedded interactively
    assert result.stats.items_fallback == interactive_items >= 4 + 5
    assert result.stats.items_batch == 64 - interactive_items
