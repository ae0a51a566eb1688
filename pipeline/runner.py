"""A run: source -> validate -> batch -> embed -> sink, stages joined by bounded anyio streams.

    list ──(obj, prev)──▶ validate xN ──Item──▶ pack ──Batch──▶ embed xC ──▶ write
                              └──────────────Reject──────────────────────────▲

Every stream is bounded, so a slow stage holds back the ones before it and memory stays bounded
whatever the corpus size. Blocking work (listing, reading, parsing, Lance writes) runs in worker
threads. The writer runs outside the producers' cancel scope: when the run must stop early (a
per-day quota, Ctrl-C), producers are cancelled and the writer still commits what was done.
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from connectors.base import Connector, content_version
from connectors.local import LocalConnector
from pipeline.batcher import BatchLimits, pack
from pipeline.config import JobConfig
from pipeline.embed import Embedder
from pipeline.endpoint import embedding_client
from pipeline.errors import (
    ConnectorError,
    QuotaExhausted,
    RejectReason,
    TransientEmbedError,
)
from pipeline.models import model_spec
from pipeline.records import Batch, FileEnd, Item, Reject, SourceObject, Vector
from pipeline.sink import LanceSink, open_db
from pipeline.state import EMBEDDED, REJECTED, FileState, Manifest
from pipeline.stats import RunStats
from pipeline.validate import Validator

log = logging.getLogger("embedpipe.run")

EXIT_OK = 0
EXIT_REJECTS = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_QUOTA = 4
EXIT_INTERRUPTED = 130

Outcome = Vector | Reject | FileState | FileEnd


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def make_connector(job: JobConfig) -> Connector:
    return LocalConnector(job.source)


@dataclass
class RunResult:
    stats: RunStats
    exit_code: int
    problems: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    """A file whose items are on their way to the table."""

    obj: SourceObject
    expected: int | None = None  # known once the validator is done with the file
    embedded: int = 0
    rejected: int = 0
    reason: str | None = None


class Run:
    def __init__(self, job: JobConfig, *, retry_rejects: bool = False,
                 on_progress: Callable[[RunStats], None] | None = None,
                 connector: Connector | None = None) -> None:
        self.job = job
        self.retry_rejects = retry_rejects
        self.on_progress = on_progress
        self.connector = connector or make_connector(job)
        self.stats = RunStats(run_id=new_run_id())
        self.fingerprint = job.fingerprint()
        self.validator = Validator(job)
        self.problems: list[str] = []
        self.failed_items = 0
        self.quota_error: QuotaExhausted | None = None
        self.interrupted = False
        self._previous: dict[str, FileState] = {}

    # --- entry point --------------------------------------------------------------------------

    async def execute(self) -> RunResult:
        self._writer_done = anyio.Event()
        self._producers = anyio.CancelScope()
        db = await anyio.to_thread.run_sync(open_db, self.job.sink.uri)
        sink_cfg = self.job.sink
        embed = self.job.embed
        self.sink = await anyio.to_thread.run_sync(
            lambda: LanceSink(db, sink_cfg.table, sink_cfg.rejects_table,
                              embed.output_dimensionality, embed.model))
        self.manifest = await anyio.to_thread.run_sync(Manifest, db, sink_cfg.manifest_table)
        self._previous = await anyio.to_thread.run_sync(self.manifest.load)
        async with embedding_client(self.job) as client:
            self.embedder = Embedder(client, model_spec(embed.model), task_type=embed.task_type,
                                     max_attempts=embed.max_attempts, stats=self.stats)
            await self._pipeline()
        self.stats.finished = datetime.now(UTC).timestamp()
        return RunResult(self.stats, self._exit_code(), self.problems)

    def _exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.quota_error is not None:
            return EXIT_QUOTA
        if self.failed_items:
            return EXIT_FAILED
        return EXIT_REJECTS if self.stats.rejects else EXIT_OK

    # --- the stages ---------------------------------------------------------------------------

    async def _pipeline(self) -> None:
        cfg = self.job.run
        todo_tx, todo_rx = anyio.create_memory_object_stream[tuple[SourceObject, FileState | None]](
            cfg.queue_size)
        items_tx, items_rx = anyio.create_memory_object_stream[Item](cfg.queue_size)
        batches_tx, batches_rx = anyio.create_memory_object_stream[Batch](
            max(2, self.job.embed.concurrency))
        out_tx, out_rx = anyio.create_memory_object_stream[Outcome](cfg.queue_size)
        limits = BatchLimits(max_requests=self.job.embed.batch_size,
                             max_bytes=self.job.embed.max_batch_bytes,
                             max_tokens=self.job.embed.max_batch_tokens)
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._write, out_rx)
            if threading.current_thread() is threading.main_thread():
                outer.start_soon(self._watch_signals)
            if self.on_progress is not None:
                outer.start_soon(self._tick)
            with self._producers:
                async with anyio.create_task_group() as tg, out_tx:
                    tg.start_soon(self._list, todo_tx, out_tx.clone())
                    async with todo_rx, items_tx:
                        for _ in range(cfg.validate_workers):
                            tg.start_soon(self._validate, todo_rx.clone(), items_tx.clone(),
                                          out_tx.clone())
                    tg.start_soon(pack, items_rx, batches_tx, limits)
                    async with batches_rx:
                        for _ in range(self.job.embed.concurrency):
                            tg.start_soon(self._embed, batches_rx.clone(), out_tx.clone())
            # out_tx is closed: the writer drains and finishes; then stop the helpers.
            await self._writer_done.wait()
            outer.cancel_scope.cancel()

    async def _list(self, todo: ObjectSendStream[tuple[SourceObject, FileState | None]],
                    out: ObjectSendStream[Outcome]) -> None:
        listing: Iterator[SourceObject | Reject] = self.connector.list()
        async with todo, out:
            while True:
                chunk = await anyio.to_thread.run_sync(lambda: list(islice(listing, 512)))
                if not chunk:
                    break
                for entry in chunk:
                    self.stats.files_seen += 1
                    if isinstance(entry, Reject):
                        self._previous.pop(entry.source.uri, None)
                        await out.send(entry)
                        continue
                    prev = self._previous.pop(entry.uri, None)
                    if prev is not None and prev.unchanged(entry, self.fingerprint) and not (
                            self.retry_rejects and prev.status == REJECTED):
                        self.stats.files_unchanged += 1
                        continue
                    if prev is None:
                        self.stats.files_new += 1
                    else:
                        self.stats.files_changed += 1
                    await todo.send((entry, prev))
        self.stats.listing_done = True

    async def _validate(self, todo: ObjectReceiveStream[tuple[SourceObject, FileState | None]],
                        items: ObjectSendStream[Item], out: ObjectSendStream[Outcome]) -> None:
        async with todo, items, out:
            async for obj, prev in todo:
                try:
                    data = await anyio.to_thread.run_sync(self.connector.read, obj)
                except ConnectorError as exc:
                    await out.send(Reject(obj, obj.version or "", RejectReason.UNREADABLE, str(exc)))
                    continue
                obj = obj.with_version(obj.version or content_version(data))
                if (prev is not None and prev.version == obj.version
                        and prev.fingerprint == self.fingerprint and not self.retry_rejects):
                    # Touched but not changed: same content, nothing to pay for.
                    self.stats.files_changed -= 1
                    self.stats.files_unchanged += 1
                    await out.send(_touched(prev, obj))
                    continue
                await self._fit(obj, data, items, out)

    async def _fit(self, obj: SourceObject, data: bytes, items: ObjectSendStream[Item],
                   out: ObjectSendStream[Outcome]) -> None:
        """Run the validator's generator in worker threads, one step at a time. A step that
        outlives the per-file limit is abandoned (its thread is left to finish on its own) and
        the file becomes a ``timeout`` reject: one pathological file cannot hang the run."""
        produced = self.validator.fit(obj, data)
        limit = self.job.validate_.file_timeout_s
        deadline = anyio.current_time() + limit * 1.5 + 1.0  # the validator checks "limit" itself
        count = 0
        while True:
            entry: Item | Reject | None = None
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as scope:
                try:
                    entry = await anyio.to_thread.run_sync(next, produced, None,
                                                           abandon_on_cancel=True)
                except Exception as exc:  # a parser bug on one file must not end the run
                    log.exception("validator failed on %s", obj.key)
                    entry = Reject(obj, obj.version, RejectReason.CORRUPT,
                                   f"{obj.key}: the validator failed: {type(exc).__name__}: {exc}",
                                   part=count if count else None)
                    produced = iter(())
            if scope.cancelled_caught:
                entry = Reject(obj, obj.version, RejectReason.TIMEOUT,
                               f"{obj.key}: validation took longer than "
                               f"{limit:g} s (validate.file_timeout_s)",
                               part=count if count else None)
                produced = iter(())
            if entry is None:
                break
            count += 1
            if isinstance(entry, Item):
                self.stats.items_validated += 1
                await items.send(entry)
            else:
                await out.send(entry)
                if entry.part is None:
                    return  # a whole-file reject completes the file by itself
        await out.send(FileEnd(obj, count))

    async def _embed(self, batches: ObjectReceiveStream[Batch],
                     out: ObjectSendStream[Outcome]) -> None:
        async with batches, out:
            async for batch in batches:
                try:
                    vectors, rejects = await self.embedder.embed_batch(batch)
                except QuotaExhausted as exc:
                    self.quota_error = exc
                    self._producers.cancel()
                    return
                except TransientEmbedError as exc:
                    # Not the files' fault: leave them undone so the next run tries again.
                    self.failed_items += len(batch.items)
                    self.problems.append(f"{len(batch.items)} items not embedded after "
                                         f"{self.job.embed.max_attempts} attempts: {exc}")
                    continue
                for vector in vectors:
                    await out.send(vector)
                for reject in rejects:
                    await out.send(reject)

    async def _write(self, out: ObjectReceiveStream[Outcome]) -> None:
        writer = _Writer(self)
        try:
            async with out:
                while True:
                    entry = None
                    with anyio.move_on_after(self.job.run.flush_interval_s):
                        try:
                            entry = await out.receive()
                        except anyio.EndOfStream:
                            break
                    if entry is not None:
                        writer.add(entry)
                    if entry is None or writer.rows >= self.job.run.flush_rows:
                        await anyio.to_thread.run_sync(writer.flush)
            await anyio.to_thread.run_sync(writer.flush)
            if self.stats.listing_done and self.job.run.on_delete == "delete":
                gone = list(self._previous)
                if gone:
                    await anyio.to_thread.run_sync(writer.delete, gone)
        finally:
            self._writer_done.set()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.interrupted = True
                self._producers.cancel()
                return

    async def _tick(self) -> None:
        assert self.on_progress is not None
        while True:
            self.on_progress(self.stats)
            await anyio.sleep(0.2)


class _Writer:
    """Buffers outcomes, tracks which files are complete, and commits them in order:
    vectors and rejects first, then the manifest rows of the files they complete."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.stats = run.stats
        self.pending: dict[tuple[str, str], _Pending] = {}
        self.vectors: list[Vector] = []
        self.rejects: list[Reject] = []
        self.completed: list[FileState] = []

    @property
    def rows(self) -> int:
        return len(self.vectors) + len(self.rejects) + len(self.completed)

    def add(self, entry: Outcome) -> None:
        if isinstance(entry, FileState):
            self.completed.append(entry)
            return
        if isinstance(entry, FileEnd):
            p = self._pending(entry.source)
            p.expected = entry.count
        elif isinstance(entry, Vector):
            self.vectors.append(entry)
            self.stats.items_embedded += 1
            self.stats.tokens += entry.tokens
            p = self._pending(entry.item.source)
            p.embedded += 1
        else:
            self.rejects.append(entry)
            self.stats.rejects += 1
            self.stats.reject_reasons[entry.reason] += 1
            p = self._pending(entry.source)
            p.rejected += 1
            p.reason = p.reason or entry.reason
            if entry.part is None:
                p.expected = 1
        self._complete(p)

    def _pending(self, obj: SourceObject) -> _Pending:
        key = (obj.uri, obj.version or "")
        if key not in self.pending:
            self.pending[key] = _Pending(obj.with_version(obj.version or ""))
        return self.pending[key]

    def _complete(self, p: _Pending) -> None:
        if p.expected is None or p.embedded + p.rejected < p.expected:
            return
        del self.pending[(p.obj.uri, p.obj.version or "")]
        status = EMBEDDED if p.embedded else REJECTED
        self.completed.append(FileState(
            p.obj.uri, p.obj.key, p.obj.version or "", p.obj.size, p.obj.mtime,
            self.run.fingerprint, status, p.embedded, p.rejected, p.reason))
        self.stats.files_done += 1

    def flush(self) -> None:
        if not (self.vectors or self.rejects or self.completed):
            return
        done = {s.uri: s.version for s in self.completed if s.status in (EMBEDDED, REJECTED)}
        self.run.sink.write(self.vectors, self.rejects, self.stats.run_id, done)
        self.run.manifest.record(self.completed, self.stats.run_id)
        self.vectors, self.rejects, self.completed = [], [], []

    def delete(self, uris: list[str]) -> None:
        self.run.sink.delete_uris(uris)
        self.run.manifest.forget(uris)
        self.stats.files_deleted += len(uris)


def _touched(prev: FileState, obj: SourceObject) -> FileState:
    return FileState(prev.uri, prev.key, prev.version, obj.size, obj.mtime, prev.fingerprint,
                     prev.status, prev.parts, prev.rejected_parts, prev.reason)


def run_job(job: JobConfig, **kwargs: Any) -> RunResult:
    """Run a job to the end (blocking)."""
    return anyio.run(lambda: Run(job, **kwargs).execute())

