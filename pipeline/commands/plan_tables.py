"""What ``embedpipe plan`` reads from the job's tables, read only (nothing is created, a
table that cannot be read predicts nothing): the manifest, open Batch API jobs, the settings
the live table holds, and the content keys the tables (and ``embed.reuse_from``) hold."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from connectors.sink_options import sink_storage_options, storage_options_for
from pipeline.config import ArrowSinkConfig, JobConfig
from pipeline.errors import SinkError
from pipeline.sinks.lance import CacheTable, find_keys, open_db, sql_str
from pipeline.state.batches import BatchLog
from pipeline.state.manifest import Manifest
from pipeline.state.tables import TableLog, TableSpace

if TYPE_CHECKING:
    from pipeline.commands.planner import Plan


@contextmanager
def manifest_rows(job: JobConfig) -> Iterator[tuple[Iterator[pa.RecordBatch] | None, int]]:
    """The manifest's rows in uri order and their count, if the job has run before; never
    creates anything."""
    uri = job.sink.state_uri
    if "://" not in uri and not (Path(uri) / f"{job.sink.manifest_table}.lance").exists():
        yield None, 0  # never ran: no need to load Lance at all
        return
    try:
        db = open_db(uri, sink_storage_options(job))
        if job.sink.manifest_table not in db.list_tables().tables:
            manifest = None
        else:
            manifest = Manifest(db, job.sink.manifest_table, read_only=True)
    except SinkError:
        manifest = None
    if manifest is None:
        yield None, 0
        return
    with manifest.sorted_rows() as rows:
        yield rows, manifest.count()


def state_db(job: JobConfig) -> Any:
    """The job's state database, if there is one to read (None before a first run)."""
    uri = job.sink.state_uri
    if "://" not in uri and not Path(uri).is_dir():
        return None
    try:
        return open_db(uri, sink_storage_options(job))
    except SinkError:
        return None


def submitted_ids(db: Any, job: JobConfig) -> frozenset[str]:
    """The item ids earlier runs' open Batch API jobs hold (read only)."""
    try:
        if job.sink.batches_table not in db.list_tables().tables:
            return frozenset()
        return frozenset(i for record in BatchLog(db, job.sink.batches_table).open()
                         for i in record.item_ids)
    except (SinkError, OSError, ValueError, RuntimeError):
        return frozenset()


def upgrade_note(db: Any, job: JobConfig, changed: int) -> str | None:
    """What a run would change of every vector, if anything (read only)."""
    if isinstance(job.sink, ArrowSinkConfig):
        return None
    try:
        held = TableLog(db, read_only=True).space(job.sink.table)
    except (SinkError, OSError, ValueError, RuntimeError):
        return None
    space = TableSpace.of_job(job)
    if held is None or held.fingerprint == space.fingerprint:
        return None
    return (f"{held.describe_change(space)}: {changed:,} files re-embedded into "
            f"{job.sink.table}-next; readers keep {job.sink.table!r} as it is until every file "
            "is done, then it is switched in one commit")


def moved_count(state: Any, job: JobConfig, gone: Any, planned: set[str]) -> int:
    """How many gone files a run would find moved: every row's content key is among the
    requests planned (a file whose parts plan cannot key is not predicted moved)."""
    if state is None or not len(gone) or isinstance(job.sink, ArrowSinkConfig):
        return 0
    try:
        if job.sink.table not in state.list_tables().tables:
            return 0
        table = state.open_table(job.sink.table)
        moved = 0
        for start in range(0, len(gone), 500):
            uris = gone[start:start + 500]
            uris = uris.to_pylist() if isinstance(uris, pa.Array) else list(uris)
            rows = table.search().where(f"uri IN ({', '.join(sql_str(u) for u in uris)})").select(
                ["uri", "content_key"]).limit(None).to_arrow().to_pylist()
            out = {r["uri"] for r in rows if r["content_key"] not in planned}
            moved += len({r["uri"] for r in rows} - out)
        return moved
    except (OSError, ValueError, RuntimeError):
        return 0


def move_stored(plan: Plan, job: JobConfig, state: Any) -> None:
    """Move the items whose requests the job's tables or its reuse_from tables hold from the
    cost to the reused (read only; a table that cannot be read predicts nothing)."""
    stores: list[Any] = []
    model, dims = job.embed.model, job.embed.output_dimensionality
    if state is not None and not isinstance(job.sink, ArrowSinkConfig):
        names = state.list_tables().tables
        stores += [state.open_table(t) for t in (job.sink.table, job.sink.table + "-next")
                   if t in names]
    for source in job.embed.reuse_from:
        try:
            options = storage_options_for(source.uri, job, source.s3, source.azure)
            if "://" in source.uri or Path(source.uri).is_dir():
                stores.append(CacheTable(open_db(source.uri, options), source.table, model,
                                         dims).table)
        except SinkError:
            continue
    keys = list(plan.keyed)
    for store in stores:
        for start in range(0, len(keys), 256):
            try:
                found = find_keys(store, keys[start:start + 256], model, dims)
            except (OSError, ValueError, RuntimeError):
                break
            for key in found:
                name, tokens = plan.keyed.pop(key)
                plan.items[name] -= 1
                plan.tokens[name] -= tokens
                plan.reused[name] += 1
                plan.reused_tokens[name] += tokens
        keys = list(plan.keyed)
