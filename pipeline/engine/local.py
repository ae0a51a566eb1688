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

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from pipeline.config import JobConfig
from pipeline.engine.batch import BatchRouter
from pipeline.engine.threads import validate_groups
from pipeline.errors import EmbedError
from pipeline.memory import in_thread, release_free_memory
from pipeline.outcome import EXIT_INTERRUPTED, RunOutcome
from pipeline.records import Batch, Item, Reject, Vector
from pipeline.stages import Stages
from pipeline.stages.listing import Todo
from pipeline.stages.packing import pack
from pipeline.stages.reuse import reuse_items, with_copies
from pipeline.stages.validation import groups
from pipeline.stages.writing import Outcome
from pipeline.state.lock import JobLock
from pipeline.stats import RunStats

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
            outer.start_soon(self._write, out_rx, writer_done)
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
            while (chunk := await in_thread(listing.next_chunk)) is not None:
                found, rejects = listing.diff(chunk)
                for group in groups(found):
                    await todo.send(group)
                if rejects:
                    await out.send(list(rejects))
        self.stats.listing_done = True
        s = self.stats
        log.info("listing done: %d files listed, %d new, %d changed, %d unchanged", s.files_seen,
                 s.files_new, s.files_changed, s.files_unchanged)
        # What the run has to do is known now: a run killed from here on shows it in `status`.
        await in_thread(self.on_listed)

    async def _validating_one(self, todo: ObjectReceiveStream[list[Todo]],
                              items: ObjectSendStream[list[Item]],
                              out: ObjectSendStream[list[Outcome]]) -> None:
        await self._validate(todo, items, out)
        self._validating -= 1
        if not self._validating:
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

    async def _write(self, out: ObjectReceiveStream[list[Outcome]], done: anyio.Event) -> None:
        writer = self.stages.writer
        cfg = self.job.run
        try:
            async with out:
                flushed = anyio.current_time()
                while True:
                    # flush_interval_s is the oldest a buffered row gets, even while rows keep
                    # coming (an idle timer would never fire under a steady trickle)
                    wait = max(0.0, cfg.flush_interval_s - (anyio.current_time() - flushed))
                    entries = None
                    with anyio.move_on_after(wait):
                        try:
                            entries = await out.receive()
                        except anyio.EndOfStream:
                            break
                    for entry in entries or ():
                        for row in with_copies(self.stages.reuse, entry):
                            writer.add(row)
                    due = anyio.current_time() - flushed >= cfg.flush_interval_s
                    if due or writer.rows >= cfg.flush_rows:
                        await in_thread(self._flush)
                        self.stages.reuse.retire(writer.take_flushed_keys())
                        flushed = anyio.current_time()
            await in_thread(self._flush)
            self.stages.reuse.retire(writer.take_flushed_keys())
            if self.stages.reuse.waiting:
                log.info("%d items wait for the vector of the same content sent by another "
                         "file, which did not come in this run: the next run does their files",
                         self.stages.reuse.waiting)
            # Only a run that went to the end deletes: a gone file's rows may hold the content
            # a moved file, not done yet, reuses.
            if (self.stats.listing_done and cfg.on_delete == "delete"
                    and self.outcome.fatal is None and not self.outcome.interrupted):
                listing = self.stages.listing
                refusal = await in_thread(
                    writer.delete, listing.gone(), listing.known, self.stats.files_seen)
                if refusal is not None:
                    self.outcome.deletion_refused = True
                    self.outcome.failed(refusal)
        finally:
            done.set()

    def _flush(self) -> None:
        writer = self.stages.writer
        rows, files = len(writer.vectors) + len(writer.rejects), len(writer.completed)
        writer.flush()
        release_free_memory()  # what the flush and the calls since the last one freed
        if rows or files:
            log.info("committed %d rows and %d files' manifest rows (%d files done)", rows,
                     files, self.stats.files_done)

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
