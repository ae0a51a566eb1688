"""A run of a job: its bookkeeping around an engine that drives the stages.

The run takes the job's lock, opens the sink and the state (manifest, run history), finds what
killed runs already paid for, builds the stages (:mod:`pipeline.stages`) and hands them to the
local engine (:mod:`pipeline.engine.local`). Afterwards it keeps the books: table upkeep and the
``run-<id>`` tag, the ``runs`` row, the JSON report and the exit code. It holds no stage logic.

This module is also the Python API: :func:`run_job` and the exit codes.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa

from connectors import connector_for
from connectors.base import Connector
from connectors.s3_options import lance_storage_options, sink_s3_options, sink_storage_options
from pipeline.atomic import write_text_atomic
from pipeline.config import ArrowSinkConfig, JobConfig, ReuseSource
from pipeline.engine import ray as ray_engine
from pipeline.engine.batch import BatchDriver, BatchRouter, open_jobs
from pipeline.engine.local import LocalEngine
from pipeline.errors import AccessError, ConfigError, PipelineError, QuotaExhausted, SinkError
from pipeline.gemini.batches import BatchApi
from pipeline.gemini.client import GeminiClient
from pipeline.gemini.endpoint import embedding_client
from pipeline.gemini.limiter import AdaptiveConcurrency, Quota, rate_limiter
from pipeline.gemini.probe import declared_batch_support, probe_batch_api
from pipeline.gemini.tasks import TaskStyle
from pipeline.metrics import prometheus_text
from pipeline.models import cost_usd, model_spec
from pipeline.outcome import EXIT_FAILED as EXIT_FAILED
from pipeline.outcome import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from pipeline.outcome import EXIT_OK as EXIT_OK
from pipeline.outcome import EXIT_QUOTA as EXIT_QUOTA
from pipeline.outcome import EXIT_USAGE as EXIT_USAGE
from pipeline.outcome import RunOutcome, exit_code_for, run_status
from pipeline.records import BatchSupport
from pipeline.sinks.arrow import ArrowSink
from pipeline.sinks.lance import CacheTable, LanceSink, open_db, preload, sql_str
from pipeline.stages import Stages
from pipeline.stages.batching import Batching
from pipeline.stages.companions import Companions
from pipeline.stages.embedding import Embedder
from pipeline.stages.listing import Listing
from pipeline.stages.packing import limits_for
from pipeline.stages.reuse import Reuse
from pipeline.stages.validation import Validation
from pipeline.stages.writing import Writer
from pipeline.state.batches import BatchLog
from pipeline.state.endpoints import EndpointLog
from pipeline.state.lock import JobLock
from pipeline.state.manifest import Manifest
from pipeline.state.runs import RunLog
from pipeline.state.tables import TableLog, TableSpace, prepare_shadow, switch, upgrade_from
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
        self.report_path: Path | None = None
        self.upgrade: TableSpace | None = None  # what the live table holds, during an upgrade
        self.final_report: dict[str, Any] = {}  # what report() says at the run's end

    @property
    def fatal(self) -> PipelineError | None:
        return self.outcome.fatal

    @property
    def failure(self) -> str | None:
        return self.outcome.failure

    @property
    def quota_error(self) -> QuotaExhausted | None:
        return self.outcome.quota_error

    def stop(self) -> None:
        """Stop early and cleanly: what is done is still committed."""
        self.outcome.interrupted = True
        if self.engine is not None:
            self.engine.stop()

    async def execute(self) -> RunResult:
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
            held = self.lock.took_over
            log.warning("took over a stale lock of run %s (pid %s on %s)", held.run_id,
                        held.pid, held.host)
        await anyio.to_thread.run_sync(self._open)
        committed = await anyio.to_thread.run_sync(self._resume)
        ended_by: BaseException | None = None
        try:
            with ExitStack() as sort, ExitStack() as cluster:
                # the manifest's sort is closed once the listing is done
                known = await anyio.to_thread.run_sync(self.manifest.count)
                rows = await anyio.to_thread.run_sync(sort.enter_context,
                                                      self.manifest.sorted_rows())
                async with embedding_client(self.job) as client:
                    stages = self._stages(client, rows, known, committed)
                    common: dict[str, Any] = {
                        "lock": self.lock, "on_listed": lambda: self._listed(sort),
                        "on_progress": self.on_progress,
                        "batch": await self._batch(client, stages)}
                    if ray_engine.wanted(self.job.run.engine):
                        # Joined from this thread: Ray sets its signal handlers in the main one.
                        ray = cluster.enter_context(ray_engine.cluster(
                            self.job, client.options, self.job.run.ray_address))
                        self.engine = ray_engine.RayEngine(
                            self.job, stages, self.stats, self.outcome, cluster=ray,
                            retry_rejects=self.retry_rejects, **common)
                    else:
                        self.engine = LocalEngine(self.job, stages, self.stats, self.outcome,
                                                  **common)
                    if self.outcome.interrupted:
                        self.engine.stop()
                    try:
                        await self.engine.run()
                    except BaseExceptionGroup as group:
                        raise _first_pipeline_error(group) from None
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
                await anyio.to_thread.run_sync(self._close, code)
        return RunResult(self.stats, code, self.outcome.problems, self.final_report)

    def _listed(self, sort: ExitStack) -> None:
        """The listing is done: free the manifest's sort (its memory and temporary files) for
        the rest of the run, and record what the run has to do."""
        sort.close()
        self.runlog.record(self._run_row(self.report("running", None)))

    def _open(self) -> None:
        job = self.job
        db = open_db(job.sink.state_uri, sink_storage_options(job))
        columns: dict[str, str] = (dict(job.source.metadata.columns) if job.source.metadata
                                   else {})
        dims, model = job.embed.output_dimensionality, job.embed.model
        self.manifest = Manifest(db, job.sink.manifest_table)
        self.db, self.tables, self.space = db, TableLog(db), TableSpace.of_job(job)
        self.sink: LanceSink | ArrowSink
        if isinstance(job.sink, ArrowSinkConfig):
            self.sink = ArrowSink(job.sink.path, job.sink.format, dims, model, columns)
        else:
            # New settings for every vector: built beside the live table, switched at the end.
            self.upgrade = upgrade_from(db, self.tables, self.manifest.table, job.sink.table,
                                        self.space)
            target = (job.sink.table if self.upgrade is None
                      else prepare_shadow(db, self.tables, job.sink.table, self.space))
            live = (db.open_table(job.sink.table) if self.upgrade is not None
                    and job.sink.table in db.list_tables().tables else None)
            self.sink = LanceSink(db, target, job.sink.rejects_table, dims, model, columns,
                                  mirror=live)
            if self.upgrade is not None:
                self.stats.upgrade = (f"{self.upgrade.describe_change(self.space)}: built in "
                                      f"{target!r}; readers keep {job.sink.table!r} as it is "
                                      "until every file is done")
        self.caches = [self._cache(source) for source in job.embed.reuse_from]
        self.runlog = RunLog(db, job.sink.runs_table)
        self.batch_log = BatchLog(db, job.sink.batches_table)
        self.endpoints = EndpointLog(db)

    def _cache(self, source: ReuseSource) -> CacheTable:
        """An ``embed.reuse_from`` table, read only; a missing one fails the run (exit 3)."""
        options = None
        if source.uri.startswith("s3://"):
            options = lance_storage_options(source.s3 or sink_s3_options(self.job))
        elif "://" not in source.uri and not Path(source.uri).is_dir():
            raise SinkError(f"embed.reuse_from: there is no folder {source.uri}")
        db = open_db(source.uri, options)
        cache = CacheTable(db, source.table, self.job.embed.model,
                           self.job.embed.output_dimensionality)
        if not cache.comparable:
            log.warning("embed.reuse_from %s holds vectors of other dimensions (or no content "
                        "keys): none of them can be reused", cache.uri)
        elif not cache.indexed and cache.table.count_rows() >= 50_000:
            log.warning("embed.reuse_from %s has no index on content_key: each look-up scans "
                        "it (its own job's runs build one)", cache.uri)
        return cache

    def _resume(self) -> dict[str, str | None]:
        """Runs that never finished (killed) left rows behind: those are paid for already.
        Their ids are skipped when met again; the runs are marked interrupted."""
        others = self.runlog.other_jobs(self.job.name)
        if others:
            sink = self.job.sink
            raise ConfigError(
                f"the table {sink.table!r} in {sink.uri} is written by job {others[0]!r} (its "
                f"{sink.runs_table!r} table says so): two jobs in one table would delete each "
                f"other's files; give job {self.job.name!r} its own sink.table (its state "
                f"follows it) or sink folder, or, if it is {others[0]!r} renamed, name it back")
        unfinished, running = self.runlog.unfinished()
        committed = self.sink.committed_ids(unfinished)
        self.runlog.mark_interrupted(running)
        self._version_before = self.sink.version()
        self.runlog.record(self._run_row(self.report("running", None)))
        return committed

    async def _batch(self, client: GeminiClient, stages: Stages) -> BatchRouter | None:
        """The Batch API path (embed.mode batch or auto), with earlier runs' open jobs, where
        the endpoint serves it (a gateway is asked once; see :mod:`pipeline.gemini.probe`)."""
        embed, stats = self.job.embed, self.stats
        if embed.mode == "interactive":
            stats.mode_why = "embed.mode is interactive"
            # Jobs an earlier run left open are still collected (what matches is adopted, not
            # paid again; the rest superseded), where the endpoint serves the Batch API.
            if not await anyio.to_thread.run_sync(self.batch_log.open):
                return None
        support = declared_batch_support(embed) or await anyio.to_thread.run_sync(
            self.endpoints.recall, client.base)
        if embed.mode == "interactive" and support is not None and not support.served:
            return None

        async def ask() -> BatchSupport:
            found = await probe_batch_api(client)
            if found.definite:
                await anyio.to_thread.run_sync(self.endpoints.remember, client.base, found)
            return found

        if embed.mode == "batch":
            support = support or await ask()
            if not support.served:
                raise AccessError(
                    f"embed.mode is batch, but the endpoint does not serve the Batch API "
                    f"({support.why}); gateways serve only the interactive methods: set "
                    "embed.mode to auto or interactive (or embed.batch_api: yes if it does "
                    "serve it)")
            stats.mode_used, stats.mode_why = "batch", f"embed.mode is batch; {support.why}"
        elif support is not None and not support.served:
            stats.mode_why = (f"embed.mode is auto, but the endpoint does not serve the Batch "
                              f"API: {support.why}")
            log.info("interactive API: %s", stats.mode_why)
            return None
        api = BatchApi(client)
        batching = Batching(embed.batch, api.entry, stages.embedder.request_for,
                            normalise=stages.embedder.normalise,
                            prefix=f"{self.job.name}-{self.stats.run_id}",
                            key=client.content_key)
        driver = BatchDriver(api, self.batch_log, batching, embed.batch, self.stats,
                             self.outcome, self.stats.run_id)
        return BatchRouter(driver, mode=embed.mode, min_items=embed.batch_min_items,
                           awaited=await open_jobs(api, self.batch_log), detach=self.detach,
                           support=support, ask=ask, refetch=stages.validation.refetch)

    def _stages(self, client: GeminiClient, manifest_rows: Iterator[pa.RecordBatch], known: int,
                committed: dict[str, str | None]) -> Stages:
        job, stats = self.job, self.stats
        embed = job.embed
        quota = Quota(rpm=embed.quota.rpm, tpm=embed.quota.tpm, rpd=embed.quota.rpd)
        companions = Companions(self.connector, job.source.sidecar, job.source.metadata)
        fingerprint = job.fingerprint()
        embedder = Embedder(client, model_spec(embed.model), style=TaskStyle.for_job(job),
                            max_attempts=embed.max_attempts, stats=stats,
                            max_quota_wait_s=embed.max_quota_wait_s,
                            backoff_base_s=embed.backoff_base_s,
                            backoff_cap_s=embed.backoff_cap_s, limiter=rate_limiter(quota),
                            concurrency=AdaptiveConcurrency(embed.concurrency))
        return Stages(
            listing=Listing(self.connector, companions, manifest_rows, known, fingerprint, stats,
                            retry_rejects=self.retry_rejects),
            validation=Validation(job, self.connector, companions, stats,
                                  retry_rejects=self.retry_rejects),
            limits=limits_for(embed),
            embedder=embedder,
            writer=Writer(self.sink, self.manifest, stats, fingerprint, stats.run_id,
                          max_delete_fraction=job.run.max_delete_fraction,
                          allow_mass_delete=self.allow_mass_delete,
                          hold_changed=self.upgrade is None,
                          on_collected=self.batch_log.collected),
            reuse=Reuse(embedder.key_for, [self.sink, *self.caches], committed, stats,
                        enabled=embed.reuse))

    def _close(self, code: int) -> None:
        """After the run: tag and upkeep (whose failure is a warning: the rows are committed,
        the night is done), then the runs row, the JSON report and the metrics, each on every
        path out (one failing does not keep the others from being written)."""
        status = run_status(code)
        if self.upgrade is not None and code == EXIT_OK and self.stats.listing_done:
            try:
                self._switch()
            except PipelineError as exc:  # the upgrade stays built: the next run switches
                self.outcome.problems.append(f"the upgraded table was not switched in: {exc}")
                log.warning("the upgraded table was not switched in: %s", exc)
        if status in ("finished", "quota", "stopped"):
            try:
                self._upkeep()
            except PipelineError as exc:
                self.stats.upkeep_warnings.append(str(exc))
                log.warning("table upkeep failed after the run's rows were committed (the "
                            "run stands): %s", exc)
        self.final_report = self.report(status, code)  # the run's figures, final: made once
        try:
            self.runlog.record(self._run_row(self.final_report))
        finally:
            self._write_report(self.final_report)
            self._write_metrics(self.final_report)

    def _switch(self) -> None:
        """Every file is in the new table: readers get it in one commit."""
        assert isinstance(self.sink, LanceSink) and self.upgrade is not None
        left = self.manifest.table.count_rows(f"fingerprint != {sql_str(self.space.fingerprint)}")
        if left:  # files not redone (unreadable this time): the upgrade is not complete
            self.outcome.problems.append(f"upgrade not switched in yet: {left:,} files still "
                                         "hold vectors of the old settings")
            return
        self.sink.vectors = switch(self.db, self.tables, self.job.sink.table,
                                   self.sink.vectors, self.space)
        self.sink.mirror = None
        self.stats.upgrade = (f"{self.upgrade.describe_change(self.space)}: done, "
                              f"{self.job.sink.table!r} now holds the new vectors")
        self.upgrade = None
        log.info("upgrade switched in: %s", self.stats.upgrade)

    def _upkeep(self) -> None:
        run = self.job.run
        changed = self.sink.version() != self._version_before
        manifest_index = ([] if run.id_index_min_rows is None
                          else self.manifest.upkeep(run.id_index_min_rows))
        for done in [*self.sink.upkeep(run.compact, run.index_min_rows, run.index_type,
                                       run.id_index_min_rows, run.keep_versions - 1,
                                       run.keep_days), *manifest_index]:
            log.info("table upkeep: %s", done)
        if changed:  # the version the run leaves (compacted, if it was): the one to name
            self.sink.tag(f"run-{self.stats.run_id}")

    def _write_metrics(self, report: dict[str, Any]) -> None:
        target = self.job.run.metrics_textfile
        if target is None:
            return
        try:
            write_text_atomic(target, prometheus_text(report))
        except OSError as exc:
            log.warning("could not write the metrics textfile %s: %s", target, exc)

    def report(self, status: str, code: int | None) -> dict[str, Any]:
        """What the run did, as the JSON report holds it (``code`` None while it is under way:
        the ``runs`` row written at its start and after its listing)."""
        return {"job": self.job.name, "status": status, "exit_code": code,
                **self.stats.as_dict(), "cost_usd": self._cost_usd(),
                # what the reused items would have cost to embed, at list prices
                "cost_saved_usd": round(cost_usd(self.stats.tokens_reused_by_modality,
                                                 self.job.embed.price_table()), 6),
                "model": self.job.embed.model, "sink": self.job.sink.uri,
                "engine": self.engine.name if self.engine is not None else None,
                "problems": self.outcome.problems[:100]}

    def _cost_usd(self) -> float:
        """What the run's tokens cost at list prices, the Batch API's at half price."""
        prices = self.job.embed.price_table()
        batch_cost = cost_usd(self.stats.tokens_batch_by_modality, prices)
        return round(cost_usd(self.stats.tokens_by_modality, prices) - batch_cost / 2, 6)

    def _write_report(self, report: dict[str, Any]) -> None:
        target = self.job.run.report
        if target is None or (target == "auto" and "://" in self.job.sink.uri):
            return
        # Beside an Arrow sink's data files the folder must stay data only: "_" hides it.
        folder = "_reports" if isinstance(self.job.sink, ArrowSinkConfig) else "reports"
        path = (Path(self.job.sink.uri) / folder / f"{self.stats.run_id}.json"
                if target == "auto" else Path(target))
        try:
            write_text_atomic(path, json.dumps(report, default=str, indent=1))
            self.report_path = path
        except OSError as exc:
            log.warning("could not write the run report to %s: %s", path, exc)

    def _run_row(self, report: dict[str, Any]) -> dict[str, Any]:
        """The run's ``runs`` row: its report's figures in the table's columns."""
        finished = report["finished"]
        return {**report, "started": datetime.fromtimestamp(report["started"], UTC),
                "finished": datetime.fromtimestamp(finished, UTC) if finished else None,
                "reject_reasons": json.dumps(report["reject_reasons"], sort_keys=True),
                "table_version": self.sink.version()}


def _first_pipeline_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Task groups wrap what their tasks raised: surface the pipeline's own error, once."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_pipeline_error(exc)
        if isinstance(exc, PipelineError):
            return exc
    first = group.exceptions[0]  # no error of ours: the first one, for the traceback
    return _first_pipeline_error(first) if isinstance(first, BaseExceptionGroup) else first


def run_job(job: JobConfig, **kwargs: Any) -> RunResult:
    """Run a job to the end (blocking): the Python API of ``embedpipe run``.

    ``kwargs`` are :class:`Run`'s (``retry_rejects``, ``allow_mass_delete``, ``detach``).
    Returns a :class:`RunResult` whatever the run's outcome (its ``exit_code`` says it);
    raises :class:`~pipeline.errors.ConfigError` for a job that cannot run (no API key, a Ray
    engine without Ray), :class:`~pipeline.state.lock.JobLocked` when another run holds the
    lock, :class:`~pipeline.errors.PipelineError` when the sink cannot be opened. Never
    ``SystemExit``."""
    return anyio.run(lambda: Run(job, **kwargs).execute())
