"""How the local engine drives Batch API jobs: submit (recorded before anything is paid),
poll with backoff, collect. The rules (what goes in a job, what a result becomes) are the
batching stage's (:mod:`pipeline.stages.batching`); the exactly-once log is
:mod:`pipeline.state.batches`; what goes to the Batch API at all is
:mod:`pipeline.engine.batch`'s.

- :meth:`BatchDriver.submit` records the job (``submitting``, with its item ids) before creating
  it, uploads its JSONL input (or sends it inline when small), then records its name
  (``pending``).
- :meth:`BatchDriver.adopt` takes over a job an earlier run submitted, with the items this run
  validated again for it: they are awaited, never submitted (paid) twice.
- :meth:`BatchDriver.collect` polls every open job, backing off from ``poll_initial_s`` to
  ``poll_max_s`` and riding out transient errors and 429s, and hands each finished job's rows
  to the writer (``max_downloads`` jobs' results downloaded at once). A job that ends
  FAILED, EXPIRED or CANCELLED leaves its items to the next run.
  :meth:`BatchDriver.look` does the same once, for the collector
  (:mod:`pipeline.engine.batch_collect`), which looks from a task of its own while jobs are
  still being filled: a job finished early lets go of its items before the last one is
  submitted, and the routing goes on while its results are downloaded.
- :class:`pipeline.engine.batch_files.ServiceFiles` deletes the files of closed jobs from the
  service, as their rows are committed; the driver has it look after each poll.
- :func:`open_jobs`: the items earlier runs' open jobs hold.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from pipeline.config import BatchSettings
from pipeline.engine.batch_collect import BusyTime, Collector, collect_finished
from pipeline.engine.batch_files import ServiceFiles
from pipeline.engine.batch_uploads import Uploader
from pipeline.errors import EmbedError, TransientEmbedError
from pipeline.gemini.batches import BatchApi, BatchJob, BatchResult
from pipeline.memory import in_thread
from pipeline.outcome import RunOutcome
from pipeline.records import Item
from pipeline.stages.batching import Batching, JobDraft, JobOutcome
from pipeline.state.batches import FAILED, PENDING, SUPERSEDED, BatchLog
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.batch")
RESULTS_CHUNK = 1000
RESULT_VALUE_BYTES = 12  # a value of a vector as JSON text, with its comma


@dataclass
class _Open:
    display_name: str
    name: str
    items: dict[str, Item]  # by id: what this run writes when the results come
    keys: dict[str, str]  # by id: the content key of each item's request
    held_bytes: int = 0  # what its items hold in memory (about)


class BatchDriver:
    def __init__(self, api: BatchApi, batch_log: BatchLog, batching: Batching,
                 settings: BatchSettings, stats: RunStats, outcome: RunOutcome,
                 run_id: str) -> None:
        self.api = api
        self.log = batch_log
        self.batching = batching
        self.settings = settings
        self.stats = stats
        self.outcome = outcome
        self.run_id = run_id
        self.open: list[_Open] = []
        self._waited = False  # whether the run has waited for room yet (said once)
        self.files = ServiceFiles(api, batch_log, stats)  # of jobs closed: deleted
        # While BatchRouter.run routes items, jobs are submitted by a task of their own, and
        # those finished are collected by another (their items are not held until the last
        # job is submitted).
        self.uploads = Uploader(self._submit_timed)
        self.collector = Collector(settings.poll_initial_s, settings.poll_max_s)

        def downloading(seconds: float) -> None:
            stats.batch_collect_s += seconds

        self.downloads = BusyTime(downloading)  # the time while any results download is on

    async def submit(self, draft: JobDraft) -> None:
        """Submit ``draft``: handed to the uploading task while :meth:`Uploader.running`
        (waiting only while the job before it is on the wire), else here."""
        started = time.perf_counter()
        try:
            await self.uploads.hand(draft)
        finally:
            self.stats.batch_upload_wait_s += time.perf_counter() - started

    async def _submit_timed(self, draft: JobDraft) -> None:
        started = time.perf_counter()
        try:
            await self._submit(draft)
        finally:
            self.stats.batch_upload_s += time.perf_counter() - started

    async def look(self, send: Callable[[JobOutcome], Awaitable[None]]) -> bool:
        """One look of the collector's: collect the jobs finished; whether any is still open."""
        await self.collect(send, wait=False)
        await self.files.release()
        return bool(self.open)

    async def _submit(self, draft: JobDraft) -> None:
        await in_thread(self.log.submitting, draft.display_name, self.run_id,
                        list(draft.items), [draft.keys[i] for i in draft.items])
        file_name = None
        try:
            # inline when the whole exchange is small: an inline job's results come back in
            # one answer (10,000 vectors of 768 dimensions are ~90 MB of JSON), a file's are
            # streamed
            answer = draft.lines.count * (self.api.client.dims * RESULT_VALUE_BYTES + 64)
            if max(draft.bytes, answer) <= self.settings.max_inline_bytes:
                inline = await in_thread(draft.lines.entries)
                job = await self.api.create(display_name=draft.display_name, inline=inline)
                del inline
            else:
                file_name = await self.api.upload(draft.lines, display_name=draft.display_name)
                job = await self.api.create(display_name=draft.display_name,
                                            file_name=file_name)
        finally:
            draft.lines.close()  # the payloads are with the service now (or the next run's)
        await in_thread(lambda: self.log.set(
            draft.display_name, status=PENDING, name=job.name, input_file=file_name))
        self.stats.batch_jobs += 1
        self.stats.items_batch_submitted += len(draft.items)
        self.open.append(_Open(draft.display_name, job.name, draft.items, draft.keys,
                               draft.held_bytes))
        self.collector.look_soon()
        log.info("submitted %s (%s): %d items", job.name, draft.display_name, len(draft.items))

    @property
    def held_bytes(self) -> int:
        """What the items of the open jobs, and of those being submitted, hold in memory
        (about)."""
        return sum(job.held_bytes for job in self.open) + self.uploads.held_bytes

    async def make_room(self) -> None:
        """While the items of the open jobs (and of those being submitted) hold more than
        ``max_held_bytes``: wait for the collector (running) to collect jobs finished, before
        another is filled. A backfill's memory stays bounded however long the Batch API
        takes."""
        limit = self.settings.max_held_bytes
        if self.held_bytes <= limit:
            return
        if not self._waited:
            self._waited = True
            log.info("the items of %d open jobs hold ~%d MB (embed.batch.max_held_bytes: %d "
                     "MB): waiting for jobs to finish before filling more",
                     len(self.open) + self.uploads.busy,
                     self.held_bytes // 1_000_000, limit // 1_000_000)
        if not self.collector.active:
            raise RuntimeError("make_room waits for the collector: run it within "
                               "BatchDriver.collector.running")
        while (self.open or self.uploads.busy) and self.held_bytes > limit:
            await self.collector.looked()  # a job on the wire: looked at once it is open

    def adopt(self, display_name: str, name: str, items: dict[str, Item],
              keys: dict[str, str], held_bytes: int = 0) -> None:
        """Take over an earlier run's job, with the items validated for it."""
        self.stats.items_batch_awaited += len(items)
        self.open.append(_Open(display_name, name, items, keys, held_bytes))
        self.collector.look_soon(0)  # it may have finished long ago

    async def supersede(self, display_name: str, name: str, items: int) -> None:
        """A job none of whose results this run wants (its files changed or went, or the
        settings did): cancelled if it still runs, recorded ``superseded`` either way, so it
        is neither awaited for ever nor shown as running."""
        try:
            info = await self.api.get(name)
            if not info.done:
                await self.api.cancel(name)
        except EmbedError as exc:
            if exc.http_status != 404:
                log.warning("superseded job %s: %s", name, exc)
                return  # tried again by the next run
        await in_thread(lambda: self.log.set(display_name, status=SUPERSEDED))
        self.stats.items_superseded += items
        log.info("batch %s (%s): no item of it is wanted any more: superseded", name,
                 display_name)

    async def collect(self, send: Callable[[JobOutcome], Awaitable[None]], *,
                      wait: bool = True) -> None:
        """Until every open job is finished and written (``wait=False``: one look, writing
        the jobs already finished and leaving the others running)."""
        delay = self.settings.poll_initial_s
        while self.open:
            await self._look(send)
            if not wait:
                return
            if self.open:
                await self.files.release()
                await anyio.sleep(delay)
                delay = min(delay * 1.5, self.settings.poll_max_s)

    async def _look(self, send: Callable[[JobOutcome], Awaitable[None]]) -> None:
        async def finish(job: _Open, info: BatchJob) -> None:
            await self._finish(job, info, send)
            self.open.remove(job)

        await collect_finished(list(self.open), self._poll, finish, self.settings.max_downloads)

    async def _poll(self, job: _Open) -> BatchJob | None:
        """The job once it is finished or gone; None while it runs, or polling it failed."""
        try:
            info = await self.api.get(job.name)
        except TransientEmbedError as exc:
            log.warning("polling %s: %s; trying again", job.name, exc)
            return None
        except EmbedError as exc:
            if exc.http_status != 404:
                raise
            # deleted, or a server that did not keep it (an emulator restarted)
            return BatchJob(job.name, "BATCH_STATE_NOT_FOUND")
        return info if info.done else None

    async def _finish(self, job: _Open, info: BatchJob,
                      send: Callable[[JobOutcome], Awaitable[None]]) -> None:
        if info.state != "BATCH_STATE_SUCCEEDED":
            self.stats.items_batch_failed += len(job.items)
            n = len(job.items)
            if self.settings.fallback == "interactive":
                # what still holds its payload (texts) is embedded now; media, whose bytes
                # went into the job, wait for the next run, which reads them again
                out = self.batching.missing(job.items)
                self.outcome.problems.append(
                    f"batch {info.name} ({job.display_name}) ended {info.state}: "
                    f"{len(out.retry):,} of its {n:,} items embedded interactively now"
                    + (f", {len(out.lost):,} submitted again by the next run" if out.lost
                       else ""))
                await send(out)
            else:
                self.outcome.failed_items += n
                self.outcome.problems.append(
                    f"batch {info.name} ({job.display_name}) ended {info.state}: its "
                    f"{n:,} items are submitted again by the next run")
            await in_thread(lambda: self.log.set(job.display_name, status=FAILED))
            return
        chunk: list[tuple[str, BatchResult]] = []
        try:
            with self.downloads.during():
                async for result in self.api.results(info):
                    chunk.append(result)
                    if len(chunk) >= RESULTS_CHUNK:
                        await send(self.batching.outcomes(job.items, job.keys, chunk))
                        chunk = []
        except EmbedError as exc:
            # Not written: the job stays pending and the next run collects it again.
            self.outcome.problems.append(f"could not read the results of {info.name}: {exc}")
            self.outcome.failed_items += len(job.items)
            return
        await send(self.batching.outcomes(job.items, job.keys, chunk))
        await send(self.batching.missing(job.items))
        log.info("collected %s (%s)", info.name, job.display_name)
        # collected once the writer has committed every row sent before this
        await send(JobOutcome(collected=job.display_name))


async def open_jobs(api: BatchApi, batch_log: BatchLog
                    ) -> dict[str, tuple[str, str, str | None]]:
    """The items earlier runs' open jobs hold (id -> (display name, job name, the content key
    of its request; None in jobs of older versions)). A job recorded as ``submitting`` (the
    run was killed before it heard back) is looked up by its display name: found, it is
    awaited like the others; not found, it was never created."""
    records = await in_thread(batch_log.open)
    awaited: dict[str, tuple[str, str, str | None]] = {}
    listed: dict[str | None, str] | None = None
    for record in records:
        name = record.name
        if name is None:
            if listed is None:
                listed = {job.display_name: job.name for job in await api.list()}
            name = listed.get(record.display_name)
            found = {"status": FAILED} if name is None else {"status": PENDING, "name": name}
            await in_thread(
                functools.partial(batch_log.set, record.display_name, **found))
            if name is None:
                continue
        keys = record.content_keys or (None,) * len(record.item_ids)
        for item_id, key in zip(record.item_ids, keys, strict=False):
            awaited[item_id] = (record.display_name, name, key)
    return awaited
