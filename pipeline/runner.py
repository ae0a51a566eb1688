"""A run: source -> validate -> batch -> embed -> sink, stages joined by bounded anyio streams.

    list ──(obj, prev)──▶ validate xN ──Item──▶ pack ──Batch──▶ embed xC ──▶ write
                              └──────────────Reject──────────────────────────▲

Every stream is bounded, so a slow stage holds back the ones before it and memory stays bounded
whatever the corpus size. Blocking work (listing, reading, parsing, Lance writes) runs in worker
threads. The writer runs outside the producers' cancel scope: when the run must stop early (a
per-day quota, Ctrl-C), producers are cancelled and the writer still commits what was done.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from connectors import connector_for
from connectors.base import Connector, content_version
from connectors.s3_options import sink_s3_options, sink_storage_options
from pipeline.arrow_sink import ArrowSink
from pipeline.batcher import BatchLimits, pack
from pipeline.companions import Companions
from pipeline.config import ArrowSinkConfig, JobConfig
from pipeline.embed import Embedder
from pipeline.endpoint import embedding_client
from pipeline.errors import (
    AccessError,
    ConnectorError,
    PipelineError,
    QuotaExhausted,
    RejectReason,
    TransientEmbedError,
)
from pipeline.lock import JobLock
from pipeline.models import cost_usd, model_spec
from pipeline.ratelimit import AdaptiveConcurrency, Quota, RateLimiter
from pipeline.records import Batch, FileEnd, Item, Reject, SourceObject, Vector
from pipeline.sink import LanceSink, open_db, preload, reject_id
from pipeline.state import (
    EMBEDDED,
    REJECTED,
    UNREADABLE,
    FileState,
    Manifest,
    RunLog,
    mass_delete_refusal,
)
from pipeline.stats import RunStats
from pipeline.tasks import TaskStyle
from pipeline.validate import Validator

log = logging.getLogger("embedpipe.run")

EXIT_OK = 0
EXIT_REJECTS = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_QUOTA = 4
EXIT_INTERRUPTED = 130

@dataclass(frozen=True, slots=True)
class _Committed:
    """An item whose row a killed run already wrote: counted toward its file, not sent again."""

    item: Item


Outcome = Vector | Reject | FileState | FileEnd | _Committed
_Todo = tuple[SourceObject, "FileState | None"]

# Files up to this size are validated in groups, one thread hop for the whole group.
SMALL_FILE_BYTES = 1_000_000
GROUP_FILES = 128
GROUP_BYTES = 4_000_000


class _ThreadCalls:
    """Counts validation calls still running in worker threads. A call the run gave up on (a
    parser past its deadline, or cut off by a signal) cannot be ended from outside; anyio's
    worker threads are not daemons, so the interpreter would wait for it at exit. The CLI
    asks :func:`threads_left` and ends the process itself once everything is committed."""

    def __init__(self) -> None:
        self.running = 0
        self._lock = threading.Lock()

    def __call__(self, fn: Callable[[], _T]) -> _T:
        with self._lock:
            self.running += 1
        try:
            return fn()
        finally:
            with self._lock:
                self.running -= 1


_T = TypeVar("_T")
_THREAD_CALLS = _ThreadCalls()


def threads_left() -> int:
    """Validation calls still running in threads the run abandoned."""
    return _THREAD_CALLS.running


def _share(per_minute: int | None) -> int:
    return max(1, per_minute // 20) if per_minute else 10**12


def run_status(code: int) -> str:
    """The ``runs`` table's status for a run that ended with this exit code."""
    return {EXIT_OK: "finished", EXIT_REJECTS: "finished", EXIT_QUOTA: "quota",
            EXIT_INTERRUPTED: "stopped"}.get(code, "failed")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


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
    ids: set[str] = field(default_factory=set)  # of its vector rows
    reject_ids: set[str] = field(default_factory=set)
    embedded: int = 0
    rejected: int = 0
    reason: str | None = None


class Run:
    def __init__(self, job: JobConfig, *, retry_rejects: bool = False,
                 allow_mass_delete: bool = False,
                 on_progress: Callable[[RunStats], None] | None = None,
                 connector: Connector | None = None) -> None:
        job.require_api_key()
        self.job = job
        self.retry_rejects = retry_rejects
        self.allow_mass_delete = allow_mass_delete
        self.on_progress = on_progress
        self.connector = connector or connector_for(job)
        preload()
        self.stats = RunStats(run_id=new_run_id())
        self.fingerprint = job.fingerprint()
        self.validator = Validator(job)
        self.companions = Companions(self.connector, job.source.sidecar, job.source.metadata)
        self.problems: list[str] = []
        # Files in flight that had rows before: their stale rows are removed on completion.
        self.replacing: dict[str, bool] = {}
        self._committed: set[str] = set()
        self.failed_items = 0
        self.quota_error: QuotaExhausted | None = None
        # A failure that is not any file's fault (the key, the endpoint, the API down): the
        # run stops, blames no file and deletes nothing.
        self.fatal: PipelineError | None = None
        self.failure: str | None = None  # why the run failed, one line (also in problems)
        self.interrupted = False
        self.deletion_refused = False
        self._previous: dict[str, FileState] = {}
        self._known = 0

    # --- entry point --------------------------------------------------------------------------

    async def execute(self) -> RunResult:
        self._writer_done = anyio.Event()
        self._producers = anyio.CancelScope()
        self.lock = JobLock(self.job.sink.uri, self.stats.run_id, self.job.name,
                            s3_options=sink_s3_options(self.job))
        await anyio.to_thread.run_sync(self.lock.acquire)
        try:
            return await self._locked()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.lock.release)

    async def _locked(self) -> RunResult:
        if self.lock.took_over is not None:
            log.warning("took over a stale lock of run %s (pid %s on %s)",
                        self.lock.took_over.run_id, self.lock.took_over.pid,
                        self.lock.took_over.host)
        db = await anyio.to_thread.run_sync(open_db, self.job.sink.state_uri,
                                            sink_storage_options(self.job))
        sink_cfg = self.job.sink
        embed = self.job.embed

        def make_sink() -> LanceSink | ArrowSink:
            if isinstance(sink_cfg, ArrowSinkConfig):
                return ArrowSink(sink_cfg.path, sink_cfg.format, embed.output_dimensionality,
                                 embed.model, self._columns())
            return LanceSink(db, sink_cfg.table, sink_cfg.rejects_table,
                             embed.output_dimensionality, embed.model, self._columns())

        self.sink = await anyio.to_thread.run_sync(make_sink)
        self.manifest = await anyio.to_thread.run_sync(Manifest, db, sink_cfg.manifest_table)
        self._previous = await anyio.to_thread.run_sync(self.manifest.load)
        self._known = len(self._previous)
        self.runlog = await anyio.to_thread.run_sync(RunLog, db, sink_cfg.runs_table)
        await anyio.to_thread.run_sync(self._resume)
        quota = Quota(rpm=embed.quota.rpm, tpm=embed.quota.tpm, rpd=embed.quota.rpd)
        limiter = RateLimiter(quota) if (quota.rpm or quota.tpm or quota.rpd) else None
        status = "failed"
        try:
            async with embedding_client(self.job) as client:
                self.embedder = Embedder(client, model_spec(embed.model),
                                         style=TaskStyle.for_job(self.job),
                                         max_attempts=embed.max_attempts, stats=self.stats,
                                         limiter=limiter,
                                         concurrency=AdaptiveConcurrency(embed.concurrency))
                try:
                    await self._pipeline()
                except BaseExceptionGroup as group:
                    raise _first_pipeline_error(group) from None
            status = "finished"
        finally:
            self.stats.finished = datetime.now(UTC).timestamp()
            code = self._exit_code() if status == "finished" else EXIT_FAILED
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close, code)
        return RunResult(self.stats, code, self.problems)

    def _columns(self) -> dict[str, str]:
        metadata = self.job.source.metadata
        return dict(metadata.columns) if metadata else {}

    def _resume(self) -> None:
        """Runs that never finished (killed) left rows behind: those are paid for already.
        Their ids are skipped when met again; the runs are marked interrupted."""
        unfinished, running = self.runlog.unfinished()
        self._committed = self.sink.committed_ids(unfinished)
        self.runlog.mark_interrupted(running)
        self._version_before = self.sink.version()
        self.runlog.record(self._run_row("running", None))

    def _close(self, code: int) -> None:
        status = run_status(code)
        if status in ("finished", "quota", "stopped"):
            run = self.job.run
            for done in self.sink.upkeep(run.compact, run.index_min_rows, run.index_type,
                                         run.id_index_min_rows):
                log.info("table upkeep: %s", done)
            if self.sink.version() != self._version_before:
                self.sink.tag(f"run-{self.stats.run_id}")
        self.runlog.record(self._run_row(status, code))
        self._write_report(status, code)

    def report(self, status: str, code: int) -> dict[str, Any]:
        """What the run did, as the JSON report holds it."""
        stats = self.stats.as_dict()
        return {"job": self.job.name, "status": status, "exit_code": code, **stats,
                "cost_usd": round(cost_usd(stats["tokens_by_modality"],
                                           self.job.embed.price_table()), 6),
                "model": self.job.embed.model, "sink": self.job.sink.uri,
                "problems": self.problems[:100]}

    def _write_report(self, status: str, code: int) -> None:
        target = self.job.run.report
        if target is None or (target == "auto" and "://" in self.job.sink.uri):
            return
        # Beside an Arrow sink's data files the folder must stay data only: "_" hides it.
        folder = "_reports" if isinstance(self.job.sink, ArrowSinkConfig) else "reports"
        path = (Path(self.job.sink.uri) / folder / f"{self.stats.run_id}.json"
                if target == "auto" else Path(target))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.report(status, code), default=str, indent=1))
            os.replace(tmp, path)
            self.report_path: Path | None = path
        except OSError as exc:
            log.warning("could not write the run report to %s: %s", path, exc)

    def _run_row(self, status: str, code: int | None) -> dict[str, Any]:
        s = self.stats
        return {
            "run_id": s.run_id, "job": self.job.name,
            "started": datetime.fromtimestamp(s.started, UTC),
            "finished": datetime.fromtimestamp(s.finished, UTC) if s.finished else None,
            "status": status, "exit_code": code, "files_seen": s.files_seen,
            "files_new": s.files_new, "files_changed": s.files_changed,
            "files_deleted": s.files_deleted, "files_unchanged": s.files_unchanged,
            "files_done": s.files_done,
            "items_embedded": s.items_embedded, "items_resumed": s.items_resumed,
            "rejects": s.rejects, "tokens": s.tokens, "api_calls": s.api_calls,
            "http_429": s.http_429, "retries": s.retries,
            "table_version": self.sink.version(),
        }

    def _exit_code(self) -> int:
        if self.fatal is not None:
            return EXIT_FAILED
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.quota_error is not None:
            return EXIT_QUOTA
        if self.failed_items or self.deletion_refused:
            return EXIT_FAILED
        return EXIT_REJECTS if self.stats.rejects else EXIT_OK

    # --- the stages ---------------------------------------------------------------------------

    async def _pipeline(self) -> None:
        cfg = self.job.run
        # Streams carry lists: per-record hops through the event loop would cost more than
        # validating a small file.
        todo_tx, todo_rx = anyio.create_memory_object_stream[list[_Todo]](cfg.validate_workers * 2)
        items_tx, items_rx = anyio.create_memory_object_stream[list[Item]](cfg.queue_size)
        # Idle callers take batches straight from the packer: queuing more would only hold
        # payloads in memory.
        batches_tx, batches_rx = anyio.create_memory_object_stream[Batch](2)
        out_tx, out_rx = anyio.create_memory_object_stream[list[Outcome]](cfg.queue_size)
        embed = self.job.embed
        # A call takes at most 1/20 of a per-minute budget: when the budget is nearly spent,
        # the next call still fits what is left, so a minute is used to 95 % or more.
        limits = BatchLimits(max_requests=min(embed.batch_size, _share(embed.quota.rpm)),
                             max_bytes=embed.max_batch_bytes,
                             max_tokens=min(embed.max_batch_tokens, _share(embed.quota.tpm)))
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._write, out_rx)
            if threading.current_thread() is threading.main_thread():
                outer.start_soon(self._watch_signals)
            if self.on_progress is not None:
                outer.start_soon(self._tick)
            outer.start_soon(self._heartbeat)
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

    async def _list(self, todo: ObjectSendStream[list[_Todo]],
                    out: ObjectSendStream[list[Outcome]]) -> None:
        """Diff the listing against the manifest; send what must be (re)done in groups of small
        files (one thread hop validates a whole group) or alone (large files)."""
        listing: Iterator[SourceObject | Reject] = self.connector.list()
        async with todo, out:
            while True:
                chunk = await anyio.to_thread.run_sync(lambda: list(islice(listing, 512)))
                if not chunk:
                    break
                rejects: list[Outcome] = []
                group: list[_Todo] = []
                group_bytes = 0
                for entry in chunk:
                    self.stats.files_seen += 1
                    if isinstance(entry, Reject):
                        self._previous.pop(entry.source.uri, None)
                        self.stats.files_rejected_at_listing += 1
                        rejects.append(entry)
                        continue
                    if self.companions.active:
                        attached = self.companions.attach(entry)
                        if attached is None:
                            self.stats.files_sidecars += 1
                            continue  # a sidecar: embedded with its media file
                        entry = attached
                    prev = self._previous.pop(entry.uri, None)
                    if prev is not None and prev.unchanged(entry, self.fingerprint) and not (
                            self.retry_rejects and prev.status == REJECTED):
                        self.stats.files_unchanged += 1
                        continue
                    if prev is None:
                        self.stats.files_new += 1
                    else:
                        self.stats.files_changed += 1
                    if entry.size > SMALL_FILE_BYTES:
                        await todo.send([(entry, prev)])
                        continue
                    group.append((entry, prev))
                    group_bytes += entry.size
                    if len(group) >= GROUP_FILES or group_bytes >= GROUP_BYTES:
                        await todo.send(group)
                        group, group_bytes = [], 0
                if group:
                    await todo.send(group)
                if rejects:
                    await out.send(rejects)
        self.stats.listing_done = True
        # What the run has to do is known now: a run killed from here on shows it in `status`.
        await anyio.to_thread.run_sync(self.runlog.record, self._run_row("running", None))

    async def _validate(self, todo: ObjectReceiveStream[list[_Todo]],
                        items: ObjectSendStream[list[Item]],
                        out: ObjectSendStream[list[Outcome]]) -> None:
        async with todo, items, out:
            async for group in todo:
                works = [_FileWork(self, obj, prev) for obj, prev in group]
                if len(works) > 1:
                    works = await self._fit_group(works, items, out)
                for work in works:
                    await self._fit(work, items, out)

    def _deadline(self) -> float:
        limit = self.job.validate_.file_timeout_s
        return anyio.current_time() + limit * 1.5 + 1.0  # the validator checks "limit" itself


    def _timeout_reject(self, work: _FileWork, part: int) -> Reject:
        return work.reject(RejectReason.TIMEOUT, f"validation took longer than "
                           f"{self.job.validate_.file_timeout_s:g} s (validate.file_timeout_s)", part)

    async def _fit_group(self, works: list[_FileWork], items: ObjectSendStream[list[Item]],
                         out: ObjectSendStream[list[Outcome]]) -> list[_FileWork]:
        """Validate small files in one thread hop. If the hop outlives its deadline, the file
        it was working on becomes a timeout reject and the files after it are returned, to be
        done one by one."""
        group = _GroupWork(works)
        per_file = self._deadline() - anyio.current_time()

        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                while not group.overdue(per_file):
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await anyio.to_thread.run_sync(_THREAD_CALLS, group.run, abandon_on_cancel=True)
            tg.cancel_scope.cancel()
        finished, current = group.stop()
        found: list[Item] = []
        other: list[Outcome] = []
        for work, entries in finished:
            self._sort(work, entries, True, 0, found, other)
        rest: list[_FileWork] = []
        if current is not None:
            self._sort(current, [self._timeout_reject(current, 0)], True, 0, found, other)
            rest = works[len(finished) + 1:]
        await self._send(found, other, items, out)
        return rest

    async def _fit(self, work: _FileWork, items: ObjectSendStream[list[Item]],
                   out: ObjectSendStream[list[Outcome]]) -> None:
        """Read and validate one file in worker threads, a chunk of items per thread hop. A hop
        that outlives the per-file limit is abandoned (its thread is left to finish on its own)
        and the file becomes a ``timeout`` reject: one pathological file cannot hang the run."""
        deadline = self._deadline()
        count = 0
        done = False
        while not done:
            chunk: list[Item | Reject | FileState] = []
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as scope:
                chunk, done = await anyio.to_thread.run_sync(_THREAD_CALLS, work.step,
                                                             abandon_on_cancel=True)
            if scope.cancelled_caught:
                chunk, done = [self._timeout_reject(work, count)], True
            found: list[Item] = []
            other: list[Outcome] = []
            count = self._sort(work, chunk, done, count, found, other)
            await self._send(found, other, items, out)

    def _sort(self, work: _FileWork, chunk: list[Item | Reject | FileState], done: bool,
              count: int, found: list[Item], other: list[Outcome]) -> int:
        """Sort a file's entries into items (to embed) and other outcomes (to write); when the
        file is done, add its FileEnd. Returns the count of its items and part rejects so far."""
        finished = done
        for entry in chunk:
            if isinstance(entry, FileState):
                # Touched but not changed: same content, nothing to pay for.
                self.stats.files_changed -= 1
                self.stats.files_unchanged += 1
                other.append(entry)
                finished = False  # complete by itself: no FileEnd
                break
            if isinstance(entry, Reject) and entry.part is None:
                other.append(entry)  # a whole-file reject completes the file by itself
                finished = False
                break
            count += 1
            if isinstance(entry, Item):
                found.append(entry)
                self.stats.items_validated += 1
            else:
                other.append(entry)
        if finished:
            other.append(FileEnd(work.obj, count))
        return count

    @staticmethod
    async def _send(found: list[Item], other: list[Outcome], items: ObjectSendStream[list[Item]],
                    out: ObjectSendStream[list[Outcome]]) -> None:
        if found:
            await items.send(found)
        if other:
            await out.send(other)

    async def _embed(self, batches: ObjectReceiveStream[Batch],
                     out: ObjectSendStream[list[Outcome]]) -> None:
        async with batches, out:
            async for batch in batches:
                paid = [_Committed(i) for i in batch.items if i.id in self._committed]
                if paid:
                    self.stats.items_resumed += len(paid)
                    await out.send(list(paid))
                    batch = Batch(tuple(i for i in batch.items if i.id not in self._committed))
                    if not batch.items:
                        continue
                try:
                    vectors, rejects = await self.embedder.embed_batch(batch)
                except QuotaExhausted as exc:
                    self.quota_error = exc
                    self._producers.cancel()
                    return
                except AccessError as exc:
                    self._fail(exc, len(batch.items))
                    return
                except TransientEmbedError as exc:
                    # The API kept failing after every retry: the next calls would too. Not
                    # the files' fault: they stay undone and the next run tries them again.
                    self._fail(exc, len(batch.items), f"after {self.job.embed.max_attempts} "
                                                      "attempts")
                    return
                await out.send([*vectors, *rejects])

    def _fail(self, exc: PipelineError, items: int, how: str = "") -> None:
        """Stop the run for an error that is no file's fault: nothing is stored against the
        files, nothing is deleted, and what was done is still committed."""
        self.failed_items += items
        if self.fatal is None:
            self.fatal = exc
            self._failed(f"the embedding API failed{' ' + how if how else ''}: {exc}; nothing "
                         "was stored against the files and nothing was deleted: run the job "
                         "again once this is fixed")
        self._producers.cancel()

    def _failed(self, why: str) -> None:
        self.failure = why  # the CLI prints it once; the report lists it among the problems
        self.problems.append(why)

    async def _write(self, out: ObjectReceiveStream[list[Outcome]]) -> None:
        writer = _Writer(self)
        try:
            async with out:
                while True:
                    entries = None
                    with anyio.move_on_after(self.job.run.flush_interval_s):
                        try:
                            entries = await out.receive()
                        except anyio.EndOfStream:
                            break
                    for entry in entries or ():
                        writer.add(entry)
                    if entries is None or writer.rows >= self.job.run.flush_rows:
                        await anyio.to_thread.run_sync(writer.flush)
            await anyio.to_thread.run_sync(writer.flush)
            if (self.stats.listing_done and self.job.run.on_delete == "delete"
                    and self.fatal is None and self._previous):
                gone = list(self._previous)
                refusal = mass_delete_refusal(
                    len(gone), self._known, self.stats.files_seen,
                    self.job.run.max_delete_fraction, self.allow_mass_delete)
                if refusal is None:
                    await anyio.to_thread.run_sync(writer.delete, gone)
                else:
                    self.deletion_refused = True
                    self._failed(refusal)
        finally:
            self._writer_done.set()

    def stop(self) -> None:
        """Stop early and cleanly: producers are cancelled, what is done is still committed."""
        self.interrupted = True
        self._producers.cancel()

    async def _watch_signals(self) -> None:
        """The first SIGINT/SIGTERM stops the run cleanly (what is done is committed); a second
        one ends the process at once: the next run redoes what was not committed."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if self.interrupted:
                    log.error("second signal: exiting now; what was not committed is redone "
                              "by the next run")
                    os._exit(EXIT_INTERRUPTED)
                log.warning("stopping: committing what is done (a second signal exits at once)")
                self.stop()

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.lock.heartbeat_s)
            await anyio.to_thread.run_sync(self.lock.beat)

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
        self.replaced: dict[str, tuple[set[str], set[str]]] = {}

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
        elif isinstance(entry, _Committed):
            p = self._pending(entry.item.source)
            p.embedded += 1
            p.ids.add(entry.item.id)
        elif isinstance(entry, Vector):
            self.vectors.append(entry)
            self.stats.items_embedded += 1
            self.stats.tokens += entry.tokens
            self.stats.tokens_by_modality[str(entry.item.modality)] += entry.tokens
            p = self._pending(entry.item.source)
            p.embedded += 1
            p.ids.add(entry.item.id)
        else:
            self.rejects.append(entry)
            self.stats.rejects += 1
            self.stats.reject_reasons[entry.reason] += 1
            p = self._pending(entry.source)
            p.rejected += 1
            p.reject_ids.add(reject_id(entry.source.uri, entry.version, entry.part))
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
        if self.run.replacing.pop(p.obj.uri, False):
            self.replaced[p.obj.uri] = (p.ids, p.reject_ids)
        status = (EMBEDDED if p.embedded else
                  UNREADABLE if p.reason == RejectReason.UNREADABLE else REJECTED)
        self.completed.append(FileState(
            p.obj.uri, p.obj.key, p.obj.version or "", p.obj.size, p.obj.mtime,
            self.run.fingerprint, status, p.embedded, p.rejected, p.reason, p.obj.companions))
        self.stats.files_done += 1

    def flush(self) -> None:
        if not (self.vectors or self.rejects or self.completed):
            return
        self.run.sink.write(self.vectors, self.rejects, self.stats.run_id, self.replaced)
        self.run.manifest.record(self.completed, self.stats.run_id)
        self.vectors, self.rejects, self.completed, self.replaced = [], [], [], {}

    def delete(self, uris: list[str]) -> None:
        self.run.sink.delete_uris(uris)
        self.run.manifest.forget(uris)
        self.stats.files_deleted += len(uris)


class _FileWork:
    """One file's blocking work, done in worker threads: read it, find its version, then pull
    its items from the validator a chunk at a time (few thread hops for small files, bounded
    memory for large ones)."""

    CHUNK_ITEMS = 32
    CHUNK_BYTES = 8_000_000

    def __init__(self, run: Run, obj: SourceObject, prev: FileState | None) -> None:
        self.run = run
        self.obj = obj
        self.prev = prev
        self.items: Iterator[Item | Reject] | None = None
        self.emitted = 0

    def reject(self, reason: str, message: str, part: int) -> Reject:
        return Reject(self.obj, self.obj.version or "", reason, f"{self.obj.key}: {message}",
                      part=part if part else None)

    def step(self) -> tuple[list[Item | Reject | FileState], bool]:
        """The next entries, and whether the file is done."""
        if self.items is None:
            try:
                data = self.run.connector.read(self.obj)
            except ConnectorError as exc:
                return [Reject(self.obj, self.obj.version or "", RejectReason.UNREADABLE,
                               str(exc))], True
            version = self.obj.version or content_version(data)
            extras = None
            if self.run.companions.active:
                version, extras = self.run.companions.read(self.obj, version)
            self.obj = self.obj.with_version(version)
            prev = self.prev
            if (prev is not None and prev.version == self.obj.version
                    and prev.status != UNREADABLE and prev.fingerprint == self.run.fingerprint
                    and not self.run.retry_rejects):
                return [_touched(prev, self.obj)], True
            if prev is not None:
                self.run.replacing[self.obj.uri] = True  # its old rows go when it completes
            self.items = self.run.validator.fit(self.obj, data, extras)
        chunk: list[Item | Reject | FileState] = []
        size = 0
        try:
            for entry in self.items:
                chunk.append(entry)
                self.emitted += 1
                size += entry.payload_bytes if isinstance(entry, Item) else 0
                if len(chunk) >= self.CHUNK_ITEMS or size >= self.CHUNK_BYTES:
                    return chunk, False
        except Exception as exc:  # a parser bug on one file must not end the run
            log.exception("validator failed on %s", self.obj.key)
            chunk.append(self.reject(RejectReason.CORRUPT, f"the validator failed: "
                                     f"{type(exc).__name__}: {exc}", self.emitted))
        return chunk, True


class _GroupWork:
    """Several small files validated in one thread hop, with progress the event loop can read
    if it gives up waiting (see :meth:`Run._fit_group`)."""

    def __init__(self, works: list[_FileWork]) -> None:
        self.works = works
        self.finished: list[tuple[_FileWork, list[Item | Reject | FileState]]] = []
        self.current: _FileWork | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self.started = time.monotonic()

    def overdue(self, limit_s: float) -> bool:
        """The file in progress has taken longer than ``limit_s``."""
        with self._lock:
            return self.current is not None and time.monotonic() - self.started > limit_s

    def run(self) -> None:
        for work in self.works:
            with self._lock:
                if self._stopped:
                    return
                self.current = work
                self.started = time.monotonic()
            entries: list[Item | Reject | FileState] = []
            done = False
            while not done:
                chunk, done = work.step()
                entries.extend(chunk)
            with self._lock:
                if self._stopped:
                    return
                self.finished.append((work, entries))
                self.current = None

    def stop(self) -> tuple[list[tuple[_FileWork, list[Item | Reject | FileState]]],
                            _FileWork | None]:
        """Freeze: what is finished, and the file in progress (None if all finished)."""
        with self._lock:
            self._stopped = True
            if len(self.finished) == len(self.works):
                return list(self.finished), None
            return list(self.finished), self.current or self.works[len(self.finished)]


def _touched(prev: FileState, obj: SourceObject) -> FileState:
    return FileState(prev.uri, prev.key, prev.version, obj.size, obj.mtime, prev.fingerprint,
                     prev.status, prev.parts, prev.rejected_parts, prev.reason, obj.companions)


def _first_pipeline_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Task groups wrap what their tasks raised: surface the pipeline's own error, once."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_pipeline_error(exc)
        if isinstance(exc, PipelineError):
            return exc
    return group


def run_job(job: JobConfig, **kwargs: Any) -> RunResult:
    """Run a job to the end (blocking)."""
    return anyio.run(lambda: Run(job, **kwargs).execute())

