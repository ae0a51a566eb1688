"""What a run opens before it starts: the sink (the live table, or the shadow an upgrade is
built in), the state tables (manifest, runs, Batch API jobs, endpoints) and the
``embed.reuse_from`` tables, all in the job's sink database. Blocking."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.sink_options import sink_storage_options, storage_options_for
from pipeline.config import ArrowSinkConfig, JobConfig, ReuseSource
from pipeline.errors import SinkError
from pipeline.sinks.arrow import ArrowSink
from pipeline.sinks.lance import CacheTable, LanceSink, open_db
from pipeline.state.batches import BatchLog
from pipeline.state.endpoints import EndpointLog
from pipeline.state.manifest import Manifest
from pipeline.state.runs import RunLog
from pipeline.state.tables import TableLog, TableSpace, prepare_shadow, upgrade_from
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.run")


@dataclass
class Opened:
    db: Any
    manifest: Manifest
    tables: TableLog
    space: TableSpace  # the settings the job's vectors are made with
    sink: LanceSink | ArrowSink
    upgrade: TableSpace | None  # what the live table holds, while an upgrade is built
    caches: list[CacheTable]
    runlog: RunLog
    batch_log: BatchLog
    endpoints: EndpointLog


def open_run_state(job: JobConfig, stats: RunStats) -> Opened:
    db = open_db(job.sink.state_uri, sink_storage_options(job))
    columns: dict[str, str] = dict(job.source.metadata.columns) if job.source.metadata else {}
    dims, model = job.embed.output_dimensionality, job.embed.model
    manifest = Manifest(db, job.sink.manifest_table)
    tables, space = TableLog(db), TableSpace.of_job(job)
    sink: LanceSink | ArrowSink
    upgrade = None
    if isinstance(job.sink, ArrowSinkConfig):
        sink = ArrowSink(job.sink.path, job.sink.format, dims, model, columns)
    else:
        # New settings for every vector: built beside the live table, switched at the end.
        upgrade = upgrade_from(db, tables, manifest.table, job.sink.table, space)
        target = (job.sink.table if upgrade is None
                  else prepare_shadow(db, tables, job.sink.table, space))
        live = (db.open_table(job.sink.table) if upgrade is not None
                and job.sink.table in db.list_tables().tables else None)
        sink = LanceSink(db, target, job.sink.rejects_table, dims, model, columns, mirror=live)
        if upgrade is not None:
            stats.upgrade = (f"{upgrade.describe_change(space)}: built in {target!r}; readers "
                             f"keep {job.sink.table!r} as it is until every file is done")
    return Opened(db=db, manifest=manifest, tables=tables, space=space, sink=sink,
                  upgrade=upgrade, caches=[open_cache(job, s) for s in job.embed.reuse_from],
                  runlog=RunLog(db, job.sink.runs_table),
                  batch_log=BatchLog(db, job.sink.batches_table), endpoints=EndpointLog(db))


def open_cache(job: JobConfig, source: ReuseSource) -> CacheTable:
    """An ``embed.reuse_from`` table, read only; a missing one fails the run (exit 3)."""
    if "://" not in source.uri and not Path(source.uri).is_dir():
        raise SinkError(f"embed.reuse_from: there is no folder {source.uri}")
    db = open_db(source.uri, storage_options_for(source.uri, job, source.s3, source.azure))
    cache = CacheTable(db, source.table, job.embed.model, job.embed.output_dimensionality)
    if not cache.comparable:
        log.warning("embed.reuse_from %s holds vectors of other dimensions (or no content "
                    "keys): none of them can be reused", cache.uri)
    elif not cache.indexed and cache.table.count_rows() >= 50_000:
        log.warning("embed.reuse_from %s has no index on content_key: each look-up scans "
                    "it (its own job's runs build one)", cache.uri)
    return cache
