"""A run of a job: its bookkeeping around an engine that drives the stages.

The run takes the job's lock, opens the sink and the state (:mod:`pipeline.state.opened`),
finds what killed runs already paid for, builds the stages (:func:`pipeline.stages.build_stages`)
and hands them to an engine (:mod:`pipeline.engine.local`, or Ray's). Afterwards its books
(:mod:`pipeline.state.books`) are kept on every path out: upkeep and the ``run-<id>`` tag, the
``runs`` row, the JSON report; and the exit code is set. It holds no stage logic.

This module is also the Python API: :func:`run_job` and the exit codes.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from connectors import connector_for
from connectors.base import Connector
from connectors.sink_options import sink_object_store
from pipeline.config import JobConfig
from pipeline.engine import ray_wanted
from pipeline.engine.batch import batch_router
from pipeline.engine.local import LocalEngine
from pipeline.errors import ConfigError, PipelineError, QuotaExhausted, first_pipeline_error
from pipeline.gemini.endpoint import embedding_client
from pipeline.memory import in_thread
from pipeline.outcome import EXIT_FAILED as EXIT_FAILED
from pipeline.outcome import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from pipeline.outcome import EXIT_OK as EXIT_OK
from pipeline.outcome import EXIT_QUOTA as EXIT_QUOTA
from pipeline.outcome import EXIT_USAGE as EXIT_USAGE
from pipeline.outcome import RunOutcome, exit_code_for
from pipeline.sinks.lance import preload
from pipeline.stages import build_stages
from pipeline.state.books import Books
from pipeline.state.lock import JobLock
from pipeline.state.opened import Opened, open_run_state
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.run")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


@dataclass
class RunResult:
    """What a run did: its counters, its exit code (the CLI's), the problems it met, and
    ``report``, the figures of its JSON report (``run --report``) as a dict."""

    stats: RunStats
    exit_code: int
    problems: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


class Run:
    def __init__(self, job: JobConfig, *, retry_rejects: bool = False,
                 allow_mass_delete: bool = False, detach: bool = False,
                 on_progress: Callable[[RunStats], None] | None = None,
                 connector: Connector | None = None) -> None:
        job.require_api_key()
        self.job = job
        self.retry_rejects = retry_rejects
        self.allow_mass_delete = allow_mass_delete
        self.detach = detach
        self.on_progress = on_progress
        self.connector = connector or connector_for(job)
        preload()
        self.stats = RunStats(run_id=new_run_id())
        self.outcome = RunOutcome()
        self.engine: LocalEngine | None = None
        self.books: Books | None = None  # once the sink and the state are open

    @property
    def fatal(self) -> PipelineError | None:
        return self.outcome.fatal

    @property
    def failure(self) -> str | None:
        return self.outcome.failure

    @property
    def quota_error(self) -> QuotaExhausted | None:
        return self.outcome.quota_error

    @property
    def report_path(self) -> Path | None:
        """Where the run's JSON report was written, if it was."""
        return self.books.report_path if self.books is not None else None

    def stop(self) -> None:
        """Stop early and cleanly: what is done is still committed."""
        self.outcome.interrupted = True
        if self.engine is not None:
            self.engine.stop()

    async def execute(self) -> RunResult:
        self.lock = JobLock(self.job.sink.uri, self.stats.run_id, self.job.name,
                            store=sink_object_store(self.job))
        await in_thread(self.lock.acquire)
        try:
            return await self._locked()
        finally:
            with anyio.CancelScope(shield=True):
                await in_thread(self.lock.release)

    async def _locked(self) -> RunResult:
        if self.lock.took_over is not None:
            held = self.lock.took_over
            log.warning("took over a stale lock of run %s (pid %s on %s)", held.run_id,
                        held.pid, held.host)
        state = await in_thread(open_run_state, self.job, self.stats)
        self.books = books = Books(self.job, self.stats, self.outcome, state)
        committed = await in_thread(self._resume, state)
        ended_by: BaseException | None = None
        try:
            with ExitStack() as sort, ExitStack() as cluster:
                # the manifest's sort is closed once the listing is done
                known = await in_thread(state.manifest.count)
                rows = await in_thread(sort.enter_context,
                                                      state.manifest.sorted_rows())
                async with embedding_client(self.job) as client:
                    stages = build_stages(
                        self.job, self.connector, client, state, self.stats, manifest_rows=rows,
                        known=known, committed=committed, retry_rejects=self.retry_rejects,
                        allow_mass_delete=self.allow_mass_delete)
                    common: dict[str, Any] = {
                        "lock": self.lock, "on_listed": lambda: self._listed(sort),
                        "on_progress": self.on_progress,
                        "batch": await batch_router(self.job, client, stages, state,
                                                    self.stats, self.outcome,
                                                    detach=self.detach)}
                    if ray_wanted(self.job.run.engine):
                        from pipeline.engine import ray as ray_engine
                        # Joined from this thread: Ray sets its signal handlers in the main one.
                        ray = cluster.enter_context(ray_engine.cluster(
                            self.job, client.options, self.job.run.ray_address))
                        self.engine = ray_engine.RayEngine(
                            self.job, stages, self.stats, self.outcome, cluster=ray,
                            retry_rejects=self.retry_rejects, **common)
                    else:
                        self.engine = LocalEngine(self.job, stages, self.stats, self.outcome,
                                                  **common)
                    books.engine = self.engine.name
                    if self.outcome.interrupted:
                        self.engine.stop()
                    try:
                        await self.engine.run()
                    except BaseExceptionGroup as group:
                        raise first_pipeline_error(group) from None
                    router = common["batch"]
                    if router is not None and not self.outcome.interrupted:
                        # the jobs whose rows the end of the run committed: their files
                        await router.driver.files.release(last=True)
        except BaseException as exc:
            ended_by = exc
            raise
        finally:
            self.stats.finished = datetime.now(UTC).timestamp()
            # The code the process exits with, also when an error ends the run: the runs row
            # must say what a scheduler saw.
            code = (self.outcome.exit_code(self.stats.batch_jobs_pending) if ended_by is None
                    else exit_code_for(ended_by))
            with anyio.CancelScope(shield=True):
                await in_thread(books.close, code)
        return RunResult(self.stats, code, self.outcome.problems, books.final_report)

    def _listed(self, sort: ExitStack) -> None:
        """The listing is done: free the manifest's sort (its memory and temporary files) for
        the rest of the run, and record what the run has to do."""
        sort.close()
        assert self.books is not None
        self.books.record(self.books.report("running", None))

    def _resume(self, state: Opened) -> dict[str, str | None]:
        """Runs that never finished (killed) left rows behind: those are paid for already.
        Their ids are skipped when met again; the runs are marked interrupted."""
        others = state.runlog.other_jobs(self.job.name)
        if others:
            sink = self.job.sink
            raise ConfigError(
                f"the table {sink.table!r} in {sink.uri} is written by job {others[0]!r} (its "
                f"{sink.runs_table!r} table says so): two jobs in one table would delete each "
                f"other's files; give job {self.job.name!r} its own sink.table (its state "
                f"follows it) or sink folder, or, if it is {others[0]!r} renamed, name it back")
        unfinished, running = state.runlog.unfinished()
        committed = state.sink.committed_ids(unfinished)
        state.runlog.mark_interrupted(running)
        assert self.books is not None
        self.books.version_before = state.sink.version()
        self.books.record(self.books.report("running", None))
        return committed


def run_job(job: JobConfig, **kwargs: Any) -> RunResult:
    """Run a job to the end (blocking): the Python API of ``embedpipe run``.

    ``kwargs`` are :class:`Run`'s (``retry_rejects``, ``allow_mass_delete``, ``detach``).
    Returns a :class:`RunResult` whatever the run's outcome (its ``exit_code`` says it);
    raises :class:`~pipeline.errors.ConfigError` for a job that cannot run (no API key, a Ray
    engine without Ray), :class:`~pipeline.state.lock.JobLocked` when another run holds the
    lock, :class:`~pipeline.errors.PipelineError` when the sink cannot be opened. Never
    ``SystemExit``."""
    return anyio.run(lambda: Run(job, **kwargs).execute())
