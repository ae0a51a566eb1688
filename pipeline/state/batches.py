"""The ``batches`` table: every Batch API job a job submitted, so no item is paid for twice.

A row is written *before* the job is created (``submitting``, with its deterministic display
name, the ids of its items and the content key of each request), then updated with the job's
name once the service answers (``pending``), and closed once its results are committed
(``collected``: the writer says so after the commit that holds its rows), when it ended without
them (``failed``: its items are submitted again), or when no run wants its results any more
(``superseded``: every item changed or was deleted, or the settings changed: paid for, not
used). A run killed at any moment leaves rows the next run
reads: a ``pending`` job's items are awaited, not submitted again; a ``submitting`` one is
looked up by its display name (the kill may have landed after the service created it).

Once a job is closed, its files on the service (its uploaded input, its responses) are
deleted and the row says so (``files_released``): see
:mod:`pipeline.engine.batch_files`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from pipeline.errors import SinkError
from pipeline.sinks.lance import open_table, sql_str, upsert
from pipeline.sinks.tables import digest_field

SUBMITTING = "submitting"
PENDING = "pending"
COLLECTED = "collected"
FAILED = "failed"
SUPERSEDED = "superseded"
OPEN = (SUBMITTING, PENDING)
CLOSED = (COLLECTED, FAILED, SUPERSEDED)

BATCHES_SCHEMA = pa.schema([
    pa.field("display_name", pa.string(), nullable=False),
    pa.field("name", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("status", pa.string()),
    pa.field("input_file", pa.string()),
    pa.field("items", pa.int64()),
    # item_ids and content_keys are rewritten with each change of the row's status:
    # uncompressed, like every column of digests (digest_field)
    pa.field("item_ids", pa.list_(digest_field("item"))),
    # The content key of each item's request (GeminiClient.content_key), in item_ids' order:
    # a result is adopted only for an item whose request would be the same now.
    pa.field("content_keys", pa.list_(digest_field("item"))),
    pa.field("created", pa.timestamp("us", tz="UTC")),
    # the job's files on the service (input, responses) are deleted (or were gone already)
    pa.field("files_released", pa.bool_()),
])


@dataclass(frozen=True, slots=True)
class BatchRecord:
    display_name: str
    name: str | None
    run_id: str
    status: str
    input_file: str | None
    item_ids: tuple[str, ...]
    content_keys: tuple[str | None, ...]
    created: datetime


class BatchLog:
    def __init__(self, db: Any, table: str = "batches") -> None:
        self.table = open_table(db, table, BATCHES_SCHEMA)
        # the writer's thread (collected) and the driver's (the rest) write it: one at a time
        self._writing = threading.Lock()

    def open(self) -> list[BatchRecord]:
        """Jobs submitted (or being submitted) whose results are not written yet."""
        rows = self._select(f"status IN ({', '.join(sql_str(s) for s in OPEN)})")
        return [BatchRecord(r["display_name"], r["name"], r["run_id"], r["status"],
                            r["input_file"], tuple(r["item_ids"] or ()),
                            tuple(r.get("content_keys") or ()), r["created"]) for r in rows]

    def releasable(self, within: timedelta) -> list[BatchRecord]:
        """Closed jobs created within ``within`` whose files are not released yet (older
        ones' files the service has deleted by itself)."""
        rows = self._select(f"status IN ({', '.join(sql_str(s) for s in CLOSED)}) "
                            "AND (files_released IS NULL OR NOT files_released)",
                            ["display_name", "name", "run_id", "status", "input_file",
                             "created"])
        since = datetime.now(UTC) - within
        return [BatchRecord(r["display_name"], r["name"], r["run_id"], r["status"],
                            r["input_file"], (), (), r["created"])
                for r in rows if r["created"] >= since]

    def released(self, display_names: list[str]) -> None:
        """These jobs' files are deleted from the service."""
        if display_names:
            names = ", ".join(sql_str(n) for n in display_names)
            self._update(f"display_name IN ({names})", {"files_released": "true"})

    def all(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.table.to_arrow().drop_columns(
            ["item_ids", "content_keys"]).to_pylist()
        return sorted(rows, key=lambda r: r["created"])

    def submitting(self, display_name: str, run_id: str, item_ids: list[str],
                   content_keys: list[str]) -> None:
        now = datetime.now(UTC)
        self._merge({"display_name": display_name, "name": None, "run_id": run_id,
                     "status": SUBMITTING, "input_file": None, "items": len(item_ids),
                     "item_ids": item_ids, "content_keys": content_keys, "created": now,
                     "files_released": None})

    def collected(self, display_names: list[str]) -> None:
        """These jobs' rows are committed: they are done."""
        for name in display_names:
            self.set(name, status=COLLECTED)

    def set(self, display_name: str, **values: str | None) -> None:
        """Update a row's ``status``, ``name`` or ``input_file``."""
        self._update(f"display_name = {sql_str(display_name)}",
                     {k: ("NULL" if v is None else sql_str(v)) for k, v in values.items()})

    def _select(self, cond: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
        """The rows matching ``cond`` (their ``columns``, or all), oldest first."""
        try:
            query = self.table.search().where(cond)
            if columns is not None:
                query = query.select(columns)
            rows: list[dict[str, Any]] = query.to_arrow().to_pylist()
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"cannot read the batch log: {exc}") from exc
        return sorted(rows, key=lambda r: r["created"])

    def _update(self, where: str, values_sql: dict[str, str]) -> None:
        try:
            with self._writing:
                self.table.update(where=where, values_sql=values_sql)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"cannot write the batch log: {exc}") from exc

    def _merge(self, row: dict[str, Any]) -> None:
        data = pa.table({f.name: [row[f.name]] for f in BATCHES_SCHEMA}, schema=BATCHES_SCHEMA)
        with self._writing:
            upsert(self.table, "display_name", data, "batch log")
