"""Quotas, retries, bisection and faults: the emulator misbehaving over real HTTP, the pipeline
recovering. Windows are shortened (window_s) so tests take seconds, not minutes."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
import lancedb
import pytest

from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.gemini.client import GeminiClient
from pipeline.gemini.limiter import AdaptiveConcurrency, Quota, RateLimiter, SlidingWindow
from pipeline.gemini.tasks import TaskStyle
from pipeline.models import model_spec
from pipeline.records import Batch, Item, Modality, Part, SourceObject, item_id
from pipeline.run import EXIT_OK, EXIT_QUOTA, run_job
from pipeline.stages.embedding import Embedder
from pipeline.stats import RunStats
from tests.conftest import write_job


def test_sliding_window_waits_for_the_oldest_spend_to_expire():
    w = SlidingWindow(60, max_requests=100, max_tokens=1000)
    assert w.wait_s(0, 60, 100) == 0
    w.add(0, 60, 100)
    w.add(10, 30, 800)
    assert w.wait_s(20, 10, 100) == 0
    assert w.wait_s(20, 20, 0) == pytest.approx(40)  # the t=0 spend frees requests at 60
    assert w.wait_s(20, 0, 200) == pytest.approx(40)
    assert w.wait_s(65, 20, 0) == 0  # t=0 spend expired
    entry = w.add(65, 10, 50)
    w.correct(entry, 5)
    assert w.tokens == 805


def test_rate_limiter_paces_callers_without_blocking_the_loop():
    async def main() -> tuple[list[float], int]:
        limiter = RateLimiter(Quota(rpm=20, margin_s=0.0), window_s=0.5)
        times: list[float] = []
        ticks = 0
        start = anyio.current_time()

        async def ticker() -> None:
            nonlocal ticks
            while anyio.current_time() - start < 1.0:
                ticks += 1
                await anyio.sleep(0.01)

        async def call() -> None:
            await limiter.acquire(10, 0)
            times.append(anyio.current_time() - start)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            for _ in range(4):
                tg.start_soon(call)
        return sorted(times), ticks

    times, ticks = anyio.run(main)
    assert times[1] < 0.1 and 0.45 < times[2] < 0.7 and 0.45 < times[3] < 0.7
    assert ticks > 50  # the loop kept running while callers waited


def test_adaptive_concurrency_halves_on_throttle_and_grows_back():
    async def main() -> list[int]:
        aimd = AdaptiveConcurrency(8)
        seen = [aimd.limit]
        aimd.on_throttle()
        seen.append(aimd.limit)
        aimd.on_throttle()
        seen.append(aimd.limit)
        for _ in range(2):
            aimd.on_success()
        seen.append(aimd.limit)
        return seen

    assert anyio.run(main) == [8, 4, 2, 3]


def test_emulator_quota_answers_googles_429():
    with Emulator(EmulatorOptions(rpm=3, rpd=5, window_s=30)) as emu:
        url = emu.base_url + "/v1beta/models/gemini-embedding-2:batchEmbedContents"
        body = {"requests": [{"model": "models/gemini-embedding-2",
                              "content": {"parts": [{"text": "x"}]}}] * 2}
        assert httpx.post(url, json=body).status_code == 200
        resp = httpx.post(url, json=body)
        assert resp.status_code == 429
        err = resp.json()["error"]
        assert err["status"] == "RESOURCE_EXHAUSTED"
        kinds = {d["@type"].rsplit(".", 1)[1]: d for d in err["details"]}
        assert "PerMinute" in kinds["QuotaFailure"]["violations"][0]["quotaId"]
        assert kinds["RetryInfo"]["retryDelay"].endswith("s")
        stats = httpx.get(emu.base_url + "/emulator/stats").json()
        assert stats["items"] == 2 and stats["http_429"] == 1  # refused calls count for nothing


def _job(tmp_path: Path, n: int, emulator: dict, **embed: object) -> Path:
    make_text_corpus(tmp_path / "src", n)
    return write_job(tmp_path, tmp_path / "src", embed={
        "provider": "emulator", "model": "gemini-embedding-2", "output_dimensionality": 128,
        "emulator": emulator, **embed})


def _table_ids(job_path: Path) -> list[str]:
    job = load_job(job_path)
    return lancedb.connect(job.sink.uri).open_table("vectors").to_arrow()["id"].to_pylist()


def test_unknown_quota_is_found_by_backing_off_on_429(tmp_path: Path):
    job = _job(tmp_path, 120, {"rpm": 40, "window_s": 1.0}, batch_size=10, concurrency=8)
    result = run_job(load_job(job))
    assert result.exit_code == EXIT_OK
    assert result.stats.http_429 > 0 and result.stats.retries >= result.stats.http_429
    ids = _table_ids(job)
    assert len(ids) == len(set(ids)) == 120


def test_a_per_minute_quota_is_waited_out_not_counted_as_attempts(tmp_path: Path):
    """Many 429s in a row for one call: the run waits for the minute instead of failing."""
    job = _job(tmp_path / "a", 120, {"rpm": 20, "window_s": 0.5}, batch_size=10,
               concurrency=8, max_attempts=2)
    result = run_job(load_job(job))
    assert result.exit_code == EXIT_OK and result.stats.http_429 > 16  # > 8 callers x 2
    assert len(set(_table_ids(job))) == 120
    impatient = _job(tmp_path / "b", 120, {"rpm": 20, "window_s": 5.0}, batch_size=10,
                     concurrency=8, max_quota_wait_s=0.5)
    failed = run_job(load_job(impatient))
    # Throttled for longer than max_quota_wait_s: the run stops cleanly (exit 4), blaming no file.
    assert failed.exit_code == EXIT_QUOTA and failed.stats.rejects == 0
    assert failed.stats.files_done < 120


def test_known_quota_makes_no_429(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import pipeline.stages as stages_module

    # The job's per-minute window, shortened like the emulator's.
    monkeypatch.setattr(stages_module, "rate_limiter",
                        lambda quota: RateLimiter(quota, window_s=1.0))
    job = _job(tmp_path, 120, {"rpm": 40, "window_s": 1.0}, batch_size=10, concurrency=8,
               quota={"rpm": 40})
    started = time.monotonic()
    result = run_job(load_job(job))
    assert result.exit_code == EXIT_OK and result.stats.http_429 == 0
    assert time.monotonic() - started > 2.0  # 120 items at 40 a window: paced, not burst


def test_per_day_quota_stops_cleanly_and_the_next_run_continues(tmp_path: Path):
    job = _job(tmp_path, 60, {"rpd": 30, "day_s": 3.0}, batch_size=10, concurrency=1)
    first = run_job(load_job(job))
    assert first.exit_code == EXIT_QUOTA
    assert first.stats.items_embedded == 30 and len(_table_ids(job)) == 30
    time.sleep(3.1)  # the emulated day ends (each run starts a new emulator: a new day anyway)
    second = run_job(load_job(job))
    assert second.exit_code == EXIT_OK and second.stats.items_embedded == 30
    assert second.stats.files_unchanged == 30
    ids = _table_ids(job)
    assert len(ids) == len(set(ids)) == 60


def test_faults_leave_every_item_embedded_exactly_once(tmp_path: Path):
    job = _job(tmp_path, 300, {"error_429": 0.05, "error_500": 0.1, "error_503": 0.05,
                               "reset": 0.05, "truncate": 0.05, "seed": 3},
               batch_size=10, max_attempts=12, timeout_s=10)
    result = run_job(load_job(job))
    assert result.exit_code == EXIT_OK and result.stats.retries > 5
    assert result.stats.http_429 > 0
    ids = _table_ids(job)
    assert len(ids) == len(set(ids)) == 300


def test_a_refused_item_is_bisected_out_of_its_batch(emulator: Emulator, corpus_dir: Path):
    obj = SourceObject("file:///x", "x", 1, datetime.now(UTC), "v")

    def item(i: int, part: Part) -> Item:
        return Item(item_id(obj.uri, "v", i, "gemini-embedding-2", 128), obj, "v", i, 20,
                    Modality.TEXT, "text/plain", (part,), 5)

    items = [item(i, Part(text=f"text {i}")) for i in range(20)]
    items[13] = item(13, Part(mime="image/png", data=b"\x89PNG not really"))

    async def main():
        async with GeminiClient(base_url=emulator.base_url, model="gemini-embedding-2",
                                dims=128) as client:
            embedder = Embedder(client, model_spec("gemini-embedding-2"),
                                style=TaskStyle(None, None, None, None),
                                max_attempts=2, stats=RunStats("t"))
            return await embedder.embed_batch(Batch(tuple(items))), embedder.stats

    (vectors, rejects), stats = anyio.run(main)
    assert len(vectors) == 19 and [r.part for r in rejects] == [13]
    assert rejects[0].reason == "api_rejected" and "Unable to process input image" in rejects[0].message
    assert stats.api_calls <= 1 + 2 * 5  # log2(20) levels of halves


def test_emulator_command_takes_quota_and_fault_flags():
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "emulator", "--port",
                             str(port), "--rpm", "2", "--api-key", "k"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(base + "/emulator/stats")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        url = base + "/v1beta/models/gemini-embedding-2:batchEmbedContents"
        body = {"requests": [{"model": "models/gemini-embedding-2",
                              "content": {"parts": [{"text": "x"}]}}] * 2}
        headers = {"x-goog-api-key": "k"}
        assert httpx.post(url, json=body, headers=headers).status_code == 200
        assert httpx.post(url, json=body, headers=headers).status_code == 429
        assert httpx.post(url, json=body).status_code == 403  # no key, as Google answers it
    finally:
        proc.kill()
        proc.wait(timeout=10)
