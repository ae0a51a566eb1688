"""Finished Batch API jobs collected while the next ones are filled.

Collecting a job is a download of its results (10,000 vectors of 3,072 dimensions are 300 MB of
JSON) and handing its rows to the writer: done in the routing task, it held up everything behind
it — no item was routed, no job filled or handed over for upload, validation stopped once its
queues were full — for as long as the download took. A :class:`Collector` looks at the open jobs
from a task of its own and collects those finished, one look at a time, while the routing goes
on; the routing waits for it (:meth:`Collector.looked`) only while the items of the open jobs
hold more than ``embed.batch.max_held_bytes``.

Its looks back off as the routing's did: the first ``poll_initial_s`` after a job is submitted
(at once after an earlier run's job is adopted: it may have finished long ago), then each wait
half as long again, up to ``poll_max_s``. Leaving :meth:`Collector.running` lets a look under
way end (its jobs' rows are never handed over in part) and stops; the run's last collect (every
job, waited for) comes after. A look that fails (an error polling that is not transient) fails
the task group, and with it the routing, as it did when the routing looked itself.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

import anyio

_Job = TypeVar("_Job")
_Info = TypeVar("_Info")


class Collector:
    def __init__(self, initial_s: float, max_s: float) -> None:
        self._delay = initial_s  # the wait before the next look
        self._max_s = max_s
        self._at: float | None = None  # when the next look is due; None: no job is open
        self._wake = anyio.Event()  # a look came due sooner, or the task is to stop
        self._looked = anyio.Event()  # set after each look; a fresh one for the next
        self._stopping = False
        self.active = False  # whether the task runs (between entering and leaving running)

    def look_soon(self, delay: float | None = None) -> None:
        """A job is open: a look within ``delay`` seconds (None: the backoff's wait), if none
        is due sooner."""
        at = anyio.current_time() + (self._delay if delay is None else delay)
        if self._at is None or at < self._at:
            self._at = at
            self._wake.set()

    async def looked(self) -> None:
        """Return after the next look has ended."""
        await self._looked.wait()

    @asynccontextmanager
    async def running(self, look: Callable[[], Awaitable[bool]]) -> AsyncIterator[None]:
        """While open, ``look`` (collect the jobs finished; returns whether any job is still
        open) runs from a task of its own when due; on leaving, a look under way ends first."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._looking, look)
            self.active = True
            try:
                yield
            finally:
                self.active = False
                self._stopping = True
                self._wake.set()

    async def _looking(self, look: Callable[[], Awaitable[bool]]) -> None:
        while not self._stopping:
            now = anyio.current_time()
            if self._at is None or now < self._at:
                with anyio.move_on_after(None if self._at is None else self._at - now):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = anyio.Event()
                continue
            still_open = await look()
            self._delay = min(self._delay * 1.5, self._max_s)
            self._at = (anyio.current_time() + self._delay) if still_open else None
            self._looked.set()
            self._looked = anyio.Event()


async def collect_finished(jobs: list[_Job], poll: Callable[[_Job], Awaitable[_Info | None]],
                           finish: Callable[[_Job, _Info], Awaitable[None]],
                           at_once: int) -> None:
    """Poll each job once (``poll``: what a finished job is, else None); collect each
    finished one (``finish``) while the others are polled, ``at_once`` at a time. One results
    download at a time left a link idle while a slow answer streamed. An error of either ends
    the look, cancelling the collections under way: a job is recorded collected only after
    all its rows (the writer commits in order), so one cut short stays pending and is
    collected again."""
    slots = anyio.Semaphore(at_once)

    async def collect(job: _Job, info: _Info) -> None:
        try:
            await finish(job, info)
        finally:
            slots.release()

    async with anyio.create_task_group() as tg:
        for job in jobs:
            info = await poll(job)
            if info is not None:
                await slots.acquire()
                tg.start_soon(collect, job, info)


class BusyTime:
    """The time while at least one of several overlapping activities is under way (two at once
    count once), handed to ``add`` as each busy stretch ends."""

    def __init__(self, add: Callable[[float], None]) -> None:
        self._add = add
        self._under_way = 0
        self._since = 0.0

    @contextmanager
    def during(self) -> Iterator[None]:
        if self._under_way == 0:
            self._since = time.perf_counter()
        self._under_way += 1
        try:
            yield
        finally:
            self._under_way -= 1
            if self._under_way == 0:
                self._add(time.perf_counter() - self._since)
