"""The allocator settings a run's process takes (pipeline/memory.py), and that a user's own
win. In subprocesses: they are process-wide."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROBE = """
import json, pyarrow as pa
from pipeline.memory import _glibc, release_free_memory, tune_for_long_run
tune_for_long_run()
release_free_memory()
print(json.dumps({"pool": pa.default_memory_pool().backend_name, "glibc": _glibc() is not None}))
"""


def _probe(code: str = PROBE, **env: str) -> dict[str, object]:
    """What ``code`` prints (one JSON object), run in a process of its own without the user's
    allocator settings (plus ``env``)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ARROW_DEFAULT_MEMORY_POOL", "MALLOC_ARENA_MAX")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, check=True,
                         capture_output=True, text=True)
    import json

    return json.loads(out.stdout)


def test_a_run_process_allocates_arrow_memory_from_the_system_allocator() -> None:
    assert _probe()["pool"] == "system"


def test_the_users_own_arrow_pool_wins() -> None:
    assert _probe(ARROW_DEFAULT_MEMORY_POOL="mimalloc")["pool"] == "mimalloc"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_glibc_is_found_on_linux() -> None:
    assert _probe()["glibc"] is True


TRIM_PROBE = """
import json
from pipeline.memory import release_free_memory, resident_bytes
HOUR = 3600.0  # the interval: only growth may trim again (whatever the machine's speed)
first, again = release_free_memory(HOUR), release_free_memory(HOUR)
held = [bytes(1000) for _ in range(200_000)]
kept = held[::50]  # what is freed lies between live blocks: only a trim hands it back
del held
before = resident_bytes()
grown = release_free_memory(HOUR)
after_interval = release_free_memory(0.0)  # the interval passed: due without growth
print(json.dumps({"first": first, "again": again, "grown": grown, "due": after_interval,
                  "freed_mb": (before - resident_bytes()) / 2**20}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_the_heap_is_trimmed_once_a_second_or_when_resident_memory_grew() -> None:
    """A flush hands free heap back at most once a second unless resident memory grew by
    32 MB since the last time: not again right after a trim (a text run's flushes each freed
    ~30 MB that the next batches faulted in again), but at once after 190 MB were allocated
    and freed between live blocks, and then the resident memory drops."""
    result = _probe(TRIM_PROBE)
    assert result["first"] is True and result["again"] is False
    assert result["grown"] is True and result["freed_mb"] > 100
    assert result["due"] is True


@pytest.mark.parametrize("mode", ["auto", "interactive"])
def test_payloads_over_the_budget_all_arrive_and_every_part_is_let_go(
        tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """With a budget smaller than one part, validation waits for each part to leave before it
    cuts the next: every file still arrives, nothing holds a part after its call (a held part
    would stall the run: the stall escape is switched off and the run is timed out instead),
    every file's clock is stopped while validation waits for room, and auto mode, which holds
    items until it knows the run's size, lets their payloads go and cuts them again once it
    knows. (The clocks are watched, not raced: a 2 s limit against the files' real work
    failed once on a machine running four suites at once.)"""
    import anyio

    import pipeline.stages.budget as budget_module
    from pipeline.config import load_job
    from pipeline.run import EXIT_OK, Run
    from pipeline.stages.budget import PayloadBudget
    from tests.conftest import copy_corpus_files, write_job

    budgets: list[PayloadBudget] = []
    real_init = PayloadBudget.__init__

    def recording_init(self: PayloadBudget, limit_bytes: int) -> None:
        real_init(self, limit_bytes)
        budgets.append(self)

    monkeypatch.setattr(PayloadBudget, "__init__", recording_init)
    import pipeline.stages.validation as validation_module
    from pipeline.stages.validation import Validation
    from pipeline.validate.deadline import Deadline

    clocks: dict[int | None, list[WatchedDeadline]] = {}  # by the task that made them

    def task() -> int | None:
        try:
            return anyio.get_current_task().id
        except RuntimeError:  # not in the event loop's thread
            return None

    class WatchedDeadline(Deadline):
        __slots__ = ("running",)

        def __init__(self, seconds: float) -> None:
            super().__init__(seconds)
            self.running = True
            clocks.setdefault(task(), []).append(self)

        def pause(self) -> None:
            super().pause()
            self.running = False

        def resume(self) -> None:
            super().resume()
            self.running = True

    monkeypatch.setattr(validation_module, "Deadline", WatchedDeadline)
    waits: list[tuple[float, int]] = []  # (seconds waited for room, its files' clocks running)
    real_room = PayloadBudget.room

    async def watched_room(self: PayloadBudget, own: int = 0) -> None:
        started, running = anyio.current_time(), sum(c.running for c in clocks.get(task(), []))
        await real_room(self, own)
        waits.append((anyio.current_time() - started, running))

    monkeypatch.setattr(PayloadBudget, "room", watched_room)

    cut_again: list[str] = []
    real_refetched = Validation.refetched

    def counting_refetched(self: Validation, items: list[Any]) -> Any:
        for item in real_refetched(self, items):
            cut_again.append(item.id)
            yield item

    monkeypatch.setattr(Validation, "refetched", counting_refetched)
    monkeypatch.setattr(budget_module, "STALL_S", 3600.0)
    monkeypatch.setattr(budget_module, "COUNTED_BYTES", 1)  # every media part counts
    # files over 1 MB: validated one at a time, the budget checked between their steps
    names = ["pdf/GeoTopo-komprimiert.pdf", "video/fire2.mp4", "video/car-detection.mp4",
             "audio/with-attached-pic.mp3", "pdf/memman.pdf"]
    copy_corpus_files(corpus_dir, names, tmp_path / "src")
    job = write_job(tmp_path, tmp_path / "src", embed={
        "provider": "emulator", "model": "gemini-embedding-2", "output_dimensionality": 128,
        "concurrency": 2, "mode": mode, "emulator": {"latency_ms": 50}},
        extra={"run": {"payload_memory_mb": 1}})

    async def run() -> object:
        with anyio.fail_after(60):
            return await Run(load_job(job)).execute()

    result = anyio.run(run)
    assert result.exit_code == EXIT_OK  # type: ignore[attr-defined]
    stats = result.stats  # type: ignore[attr-defined]
    assert stats.rejects == 0 and stats.files_done == len(names)
    (budget,) = budgets
    assert budget.peak > budget.limit  # it was full: validation waited
    assert sum(map(len, clocks.values())) >= len(names) and sum(w for w, _ in waits) > 0.2
    assert [(w, n) for w, n in waits if n] == []  # no file's clock ran while it waited for room
    import gc

    gc.collect()
    assert budget.held == 0  # every part let go
    # auto mode holds the items until it knows the run is small: their payloads were let go
    # and cut again from the files once it knew, not held over the budget
    assert bool(cut_again) == (mode == "auto") and len(set(cut_again)) == len(cut_again)
