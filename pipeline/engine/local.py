"""The local engine: the stages in one process, joined by bounded anyio streams.

    listing ──[Todo groups]──▶ validation xW ──[Items]──▶ reuse ──▶ packing ──[Batch]──▶ embedding xC
       └─────[listing rejects]──┴──[Reject, FileEnd, FileState]─┴─[reused rows]──┬──[Vector, Reject]
                                                                                  ▼
                                                                               writing

Every stream is bounded, so a slow stage holds back the ones before it and memory stays bounded
whatever the corpus size. Blocking work (listing, reading, parsing, Lance commits) runs in worker
threads; the per-file deadline is enforced by :mod:`pipeline.engine.threads`. The writer runs
outside the producers' cancel scope: when the run must stop early (a per-day quota, an error
that is no file's fault, a signal), producers are cancelled and the writer still commits what
was done. Streams carry lists: a hop through the event loop per record would cost more than
validating a small file.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from pipeline.config import JobConfig
from pipeline.engine.batch import BatchRouter
from pipeline.engine.committing import Committer
from pipeline.engine.threads import validate_groups
from pipeline.errors import EmbedError, SourceUnavailable, first_pipeline_error
from pipeline.memory import in_thread
from pipeline.outcome import EXIT_INTERRUPTED, RunOutcome
from pipeline.records import Batch, Item, Reject, Vector
from pipeline.stages import Stages
from pipeline.stages.listing import Todo
from pipeline.stages.packing import pack
from pipeline.stages.reuse import reuse_items
from pipeline.stages.validation import groups
from pipeline.stages.writing import Outcome
from pipeline.state.lock import JobLock
from pipeline.stats import RunStats

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("embedpipe.run")


class LocalEngine:
    name = "local"
    def __init__(self, job: JobConfig, stages: Stages, stats: RunStats, outcome: RunOutcome, *,
                 lock: JobLock, on_listed: Callable[[], None],
                 on_progress: Callable[[RunStats], None] | None = None,
                 batch: BatchRouter | None = None) -> None:
        self.job = job
        self.stages = stages
        self.stats = stats
        self.outcome = outcome
        self.lock = lock
        self.on_listed = on_listed
        self.on_progress = on_progress
        self.batch = batch
        self._producers = anyio.CancelScope()
        self._first_call = False
        self._validating = 0
        # groups of small files take turns where reading them waits on nothing (local disk)
        self._small_groups = None if stages.validation.connector.reads_wait else anyio.Lock()

    def stop(self) -> None:
        """Stop early and cleanly: producers are cancelled, what is done is still committed."""
        self.outcome.interrupted = True
        self._producers.cancel()

    async def run(self) -> None:
        cfg = self.job.run
        todo_tx, todo_rx = anyio.create_memory_object_stream[list[Todo]](cfg.validate_workers * 2)
        items_tx, items_rx = anyio.create_memory_object_stream[list[Item]](cfg.queue_size)
        # Idle callers take batches straight from the packer: queuing more would only hold
        # payloads in memory.
        batches_tx, batches_rx = anyio.create_memory_object_stream[Batch](2)
        out_tx, out_rx = anyio.create_memory_object_stream[list[Outcome]](cfg.queue_size)
        writer_done = anyio.Event()
        async with anyio.create_task_group() as outer:
            outer.start_soon(Committer(self.job, self.stages, self.stats, self.outcome).run,
                             out_rx, writer_done)
            if threading.current_thread() is threading.main_thread():
                outer.start_soon(self._watch_signals)
            if self.on_progress is not None:
                outer.start_soon(self._tick, self.on_progress)
            outer.start_soon(self._heartbeat)
            with self._producers:
                async with anyio.create_task_group() as tg, out_tx:
                    tg.start_soon(self._list, todo_tx, out_tx.clone())
                    async with todo_rx, items_tx:
                        self._validating = self.validate_slots()
                        for _ in range(self._validating):
                            tg.start_soon(self._validating_one, todo_rx.clone(),
                                          items_tx.clone(), out_tx.clone())
                    sent_tx, sent_rx = anyio.create_memory_object_stream[list[Item]](
                        cfg.queue_size)
                    tg.start_soon(reuse_items, self.stages.reuse, items_rx, sent_tx,
                                  out_tx.clone())
                    limits = self.stages.limits
                    if self.batch is None:
                        tg.start_soon(pack, limits, sent_rx, batches_tx)
                    else:  # reuse -> the batch router -> packing (what stays interactive)
                        pack_tx, pack_rx = anyio.create_memory_object_stream[list[Item]](
                            cfg.queue_size)
                        tg.start_soon(self.batch.run, sent_rx, pack_tx, out_tx.clone())
                        tg.start_soon(pack, limits, pack_rx, batches_tx)
                    async with batches_rx:
                        for _ in range(self.job.embed.concurrency):
                            tg.start_soon(self._embed, batches_rx.clone(), out_tx.clone())
            # out_tx is closed: the writer drains and finishes; then stop the helpers.
            await writer_done.wait()
            outer.cancel_scope.cancel()

    async def _list(self, todo: ObjectSendStream[list[Todo]],
                    out: ObjectSendStream[list[Outcome]]) -> None:
        listing = self.stages.listing
        async with todo, out:
            first = True
            while (chunk := await self._next_chunk(first)) is not None:
                first = False
                found, rejects = listing.diff(chunk)
                try:
                    for group in groups(found):
                        await todo.send(group)
                except anyio.BrokenResourceError:
                    if self.outcome.fatal is None:
                        raise
                    return  # validation stopped the run (the source failed): list no further
                if rejects:
                    await out.send(list(rejects))
        if self.outcome.fatal is not None:
            return  # the source failed: the listing is not done
        self.stats.listing_done = True
        s = self.stats
        log.info("listing done: %d files listed, %d new, %d changed, %d unchanged", s.files_seen,
                 s.files_new, s.files_changed, s.files_unchanged)
        # What the run has to do is known now: a run killed from here on shows it in `status`.
        await in_thread(self.on_listed)

    async def _next_chunk(self, first: bool) -> pa.Table | None:
        """The listing's next chunk; None at its end, or when the source failed past the
        first chunk (the run stops: what is done is committed, nothing is deleted). Failing at
        the first, the run has done nothing: it ends with the error."""
        try:
            return await in_thread(self.stages.listing.next_chunk)
        except SourceUnavailable as exc:
            if first:
                raise
            self._source_failed(exc)
            return None

    def _source_failed(self, exc: SourceUnavailable) -> None:
        self.outcome.source_failed(exc)
        self._producers.cancel()

    async def _validating_one(self, todo: ObjectReceiveStream[list[Todo]],
                              items: ObjectSendStream[list[Item]],
                              out: ObjectSendStream[list[Outcome]]) -> None:
        try:
            await self._validate(todo, items, out)
        except* SourceUnavailable as group:  # no file's fault: what is done is committed
            first = first_pipeline_error(group)
            assert isinstance(first, SourceUnavailable)
            self._source_failed(first)
        self._validating -= 1
        if not self._validating and self.outcome.fatal is None:
            log.info("validation done: %d items from %d files", self.stats.items_validated,
                     self.stats.files_new + self.stats.files_changed)

    async def _validate(self, todo: ObjectReceiveStream[list[Todo]],
                        items: ObjectSendStream[list[Item]],
                        out: ObjectSendStream[list[Outcome]]) -> None:
        await validate_groups(self.stages.validation, todo, items, out, self._small_groups)

    async def _embed(self, batches: ObjectReceiveStream[Batch],
                     out: ObjectSendStream[list[Outcome]]) -> None:
        embedder = self.stages.embedder
        async with batches, out:
            async for batch in batches:
                if not self._first_call:
                    self._first_call = True
                    log.info("first embedding call: %d items", len(batch.items))
                try:
                    vectors, rejects = await self._embed_call(batch)
                except EmbedError as exc:  # the call's failure, not the items': stop
                    self.outcome.stopped_by(exc, len(batch.items), embedder.max_attempts)
                    self._producers.cancel()
                    return
                # the payloads go now, not when the next batch comes (the payload budget)
                del batch
                await out.send([*vectors, *rejects])

    def validate_slots(self) -> int:
        """How many groups of files are validated at once."""
        return self.job.run.validate_workers

    async def _embed_call(self, batch: Batch) -> tuple[list[Vector], list[Reject]]:
        """One batch's call (with its retries), in this process."""
        return await self.stages.embedder.embed_batch(batch)

    async def _watch_signals(self) -> None:
        """The first SIGINT/SIGTERM stops the run cleanly (what is done is committed); a second
        one ends the process at once: the next run redoes what was not committed."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if self.outcome.interrupted:
                    log.error("second signal: exiting now; what was not committed is redone "
                              "by the next run")
                    os._exit(EXIT_INTERRUPTED)
                log.warning("stopping: committing what is done (a second signal exits at once)")
                self.stop()

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.lock.heartbeat_s)
            await in_thread(self.lock.beat)

    async def _tick(self, on_progress: Callable[[RunStats], None]) -> None:
        while True:
            on_progress(self.stats)
            await anyio.sleep(0.2)
