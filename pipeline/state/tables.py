"""The ``tables`` table: what each vectors table holds — the settings every one of its vectors
was made with — so a change of them is an upgrade built beside it, never a mix in it.

A vectors table is *live*: readers and ``embedpipe search`` use it under its stable name. When
the job's settings change anything that changes every vector (the model, the dimensions, the
task type or templates, how files are cut: :meth:`pipeline.config.JobConfig.fingerprint`), runs
write the new vectors into ``{table}-next`` instead (the manifest then describes that table) and,
once a run has done every file, the live table is replaced by it in one commit: a reader sees
the old table or the new one, never a mix. A run killed or stopped part-way leaves the live
table as it was; the next run continues the upgrade without paying twice.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.errors import SinkError
from pipeline.sinks.lance import first_model, open_table, sql_str, upsert, vector_dims

TABLES_TABLE = "tables"
SHADOW_SUFFIX = "-next"

TABLES_SCHEMA = pa.schema([
    pa.field("name", pa.string(), nullable=False),
    pa.field("fingerprint", pa.string()),
    pa.field("settings", pa.string()),  # a JSON object: TableSpace's fields
    pa.field("updated", pa.timestamp("us", tz="UTC")),
])


@dataclass(frozen=True, slots=True)
class TableSpace:
    """The settings a table's vectors were made with: vectors of two spaces do not compare."""

    fingerprint: str
    model: str
    dims: int
    task_type: str | None = None
    query_task_type: str | None = None
    document_template: str | None = None
    query_template: str | None = None

    @classmethod
    def of_job(cls, job: JobConfig) -> TableSpace:
        e = job.embed
        return cls(job.fingerprint(), e.model, e.output_dimensionality, e.task_type,
                   e.query_task_type, e.document_template, e.query_template)

    def describe_change(self, to: TableSpace) -> str:
        """What differs, in a few words (``model gemini-embedding-001 -> gemini-embedding-2``)."""
        changed = [f"{name} {getattr(self, name)} -> {getattr(to, name)}"
                   for name in ("model", "dims", "task_type", "document_template")
                   if getattr(self, name) != getattr(to, name)]
        return ", ".join(changed) or "how files are cut or sent (validate settings)"

    def job_for_queries(self, job: JobConfig) -> JobConfig:
        """``job`` with this table's model, dimensions and query settings: a query must be
        embedded as the table's vectors were, whatever the job says now."""
        embed = job.embed.model_copy(update={
            "model": self.model, "output_dimensionality": self.dims,
            "query_task_type": self.query_task_type, "query_template": self.query_template})
        return job.model_copy(update={"embed": embed})


def shadow_name(table: str) -> str:
    return f"{table}{SHADOW_SUFFIX}"


class TableLog:
    def __init__(self, db: Any, table: str = TABLES_TABLE, *, read_only: bool = False) -> None:
        self.table: Any = None
        if not read_only or table in db.list_tables().tables:
            self.table = open_table(db, table, TABLES_SCHEMA)

    def space(self, table: str) -> TableSpace | None:
        """What ``table`` holds, if it was recorded."""
        if self.table is None:
            return None
        try:
            rows = self.table.search().where(f"name = {sql_str(table)}").to_arrow().to_pylist()
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"cannot read the tables table: {exc}") from exc
        return TableSpace(**json.loads(rows[0]["settings"])) if rows else None

    def record(self, table: str, space: TableSpace) -> None:
        data = pa.table({"name": [table], "fingerprint": [space.fingerprint],
                         "settings": [json.dumps(asdict(space))],
                         "updated": [datetime.now(UTC)]}, schema=TABLES_SCHEMA)
        upsert(self.table, "name", data, "tables table")

    def forget(self, table: str) -> None:
        try:
            self.table.delete(f"name = {sql_str(table)}")
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"cannot write the tables table: {exc}") from exc


def upgrade_from(db: Any, tables: TableLog, manifest_table: Any, live: str,
                 space: TableSpace) -> TableSpace | None:
    """What the live table holds when it is not ``space`` (the run is then an upgrade), else
    None. A table written before spaces were recorded is judged by the manifest: if none of
    its files was made with these settings, they changed."""
    known = tables.space(live)
    if known is None:
        known = _found(db, manifest_table, live, space)
        tables.record(live, known)
    return None if known.fingerprint == space.fingerprint else known


def _found(db: Any, manifest_table: Any, live: str, space: TableSpace) -> TableSpace:
    """The space of a table with no record: the job's, unless its files say otherwise."""
    if live not in db.list_tables().tables or not manifest_table.count_rows():
        return space
    if manifest_table.count_rows(f"fingerprint = {sql_str(space.fingerprint)}"):
        return space
    prints = manifest_table.search().select(["fingerprint"]).limit(None).to_arrow()
    ((most, _),) = Counter(prints["fingerprint"].to_pylist()).most_common(1)
    table = db.open_table(live)
    return TableSpace(most, first_model(table) or "unknown",
                      vector_dims(table.schema) or space.dims)


def prepare_shadow(db: Any, tables: TableLog, live: str, space: TableSpace) -> str:
    """The table an upgrade writes to; one left by an upgrade to other settings is dropped."""
    shadow = shadow_name(live)
    building = tables.space(shadow)
    stale = building is not None and building.fingerprint != space.fingerprint
    if stale and shadow in db.list_tables().tables:
        db.drop_table(shadow)
    tables.record(shadow, space)
    return shadow


def switch(db: Any, tables: TableLog, live: str, shadow: Any, space: TableSpace) -> Any:
    """Replace the live table's rows by the shadow's in one commit (readers see the old table
    or the new one; earlier versions stay readable until cleaned up), then drop the shadow.
    Returns the live table."""
    rows = shadow.search().limit(None).to_batches(8192)
    try:
        if live in db.list_tables().tables:
            table = db.open_table(live)
            table.add(rows, mode="overwrite")
        else:
            table = db.create_table(live, rows)
        tables.record(live, space)
        db.drop_table(shadow.name)
        tables.forget(shadow.name)
    except (OSError, ValueError, RuntimeError) as exc:
        raise SinkError(f"cannot switch {live!r} to the upgraded vectors: {exc}") from exc
    return table
