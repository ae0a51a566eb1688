"""The ``runs`` table: one row per run, so an operator (and the next run) can see what each did.

A run writes its row when it starts (``running``), again once its listing is done (what it has to
do is known from then on), and when it ends (``finished``, ``quota``, ``stopped`` or ``failed``).
A run killed at any moment leaves its row ``running``; the next run marks it ``interrupted``
and reads back the ids of the rows it committed, which are never paid for again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipeline.errors import SinkError
from pipeline.sinks.lance import open_table, sql_str, upsert

RUNS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("job", pa.string()),
    pa.field("started", pa.timestamp("us", tz="UTC")),
    pa.field("finished", pa.timestamp("us", tz="UTC")),
    pa.field("status", pa.string()),
    pa.field("exit_code", pa.int32()),
    pa.field("files_seen", pa.int64()),
    pa.field("files_new", pa.int64()),
    pa.field("files_changed", pa.int64()),
    pa.field("files_deleted", pa.int64()),
    pa.field("files_unchanged", pa.int64()),
    pa.field("files_done", pa.int64()),
    pa.field("items_embedded", pa.int64()),
    pa.field("items_resumed", pa.int64()),
    pa.field("rejects", pa.int64()),
    pa.field("tokens", pa.int64()),
    pa.field("api_calls", pa.int64()),
    pa.field("http_429", pa.int64()),
    pa.field("retries", pa.int64()),
    pa.field("table_version", pa.int64()),
    # Added for the run history page (``embedpipe report``); empty in rows of older runs.
    pa.field("wall_s", pa.float64()),
    pa.field("cost_usd", pa.float64()),
    pa.field("latency_p50_s", pa.float64()),
    pa.field("latency_p95_s", pa.float64()),
    pa.field("reject_reasons", pa.string()),  # a JSON object: reason -> rejects
    pa.field("engine", pa.string()),
    pa.field("model", pa.string()),
    pa.field("mode_used", pa.string()),  # interactive or batch (see the report's mode_why)
    pa.field("items_reused", pa.int64()),  # written with a stored vector: no call
    pa.field("files_moved", pa.int64()),  # gone, their content found under another path
])

RUNNING = "running"
INTERRUPTED = "interrupted"  # a run that never finished (killed); found by the next run


def _by_start(row: dict[str, Any]) -> datetime:
    return row["started"] or datetime.min.replace(tzinfo=UTC)


class RunLog:
    """The ``runs`` table: one row per run, written at its start (``running``) and its end."""

    def __init__(self, db: Any, table: str) -> None:
        self.table = open_table(db, table, RUNS_SCHEMA)

    def unfinished(self) -> tuple[list[str], list[str]]:
        """(runs since the last finished one, the ones among them still marked running).
        Such runs may have committed rows of files they never completed: killed (still
        "running"), failed, stopped or out of quota. A finished run completed every file
        before it, so older runs need no look."""
        try:
            rows = self.table.to_arrow().select(["run_id", "status", "started"]).to_pylist()
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"cannot read the run history: {exc}") from exc
        rows.sort(key=_by_start)
        since: list[dict[str, Any]] = []
        for row in rows:
            since = [] if row["status"] == "finished" else [*since, row]
        return ([str(r["run_id"]) for r in since],
                [str(r["run_id"]) for r in since if r["status"] == RUNNING])

    def other_jobs(self, job: str) -> list[str]:
        """Names of other jobs that ran into this table."""
        try:
            names = self.table.to_arrow().column("job").to_pylist()
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"cannot read the run history: {exc}") from exc
        return sorted({n for n in names if n and n != job})

    def record(self, row: dict[str, Any]) -> None:
        data = {f.name: [row.get(f.name)] for f in RUNS_SCHEMA}
        upsert(self.table, "run_id", pa.table(data, schema=RUNS_SCHEMA), "run history")

    def mark_interrupted(self, run_ids: list[str]) -> None:
        if run_ids:
            cond = f"run_id IN ({', '.join(sql_str(r) for r in run_ids)})"
            try:
                self.table.update(where=cond, values={"status": INTERRUPTED})
            except (OSError, ValueError, RuntimeError) as exc:
                raise SinkError(f"cannot write the run history: {exc}") from exc



def last_runs(db: Any, table: str, n: int) -> list[dict[str, Any]]:
    """The last ``n`` runs' rows, oldest first, read without changing the table: a column an
    older version did not write is None in every row."""
    try:
        data = db.open_table(table).to_arrow()
    except (OSError, ValueError, RuntimeError) as exc:
        raise SinkError(f"cannot read the run history: {exc}") from exc
    rows: list[dict[str, Any]] = data.to_pylist()
    rows.sort(key=_by_start)
    blank = dict.fromkeys(RUNS_SCHEMA.names)
    return [blank | row for row in rows[-n:]]
