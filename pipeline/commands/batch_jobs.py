"""``embedpipe batches``: a job's Batch API jobs, as its batch log and the service know them,
and cancelling the open ones (their items are then submitted again by the next run)."""

from __future__ import annotations

from typing import Any

from connectors.sink_options import sink_storage_options
from pipeline.config import JobConfig
from pipeline.gemini.batches import BatchApi
from pipeline.gemini.endpoint import embedding_client
from pipeline.sinks.lance import open_db
from pipeline.state.batches import FAILED, OPEN, BatchLog


async def batch_jobs(job: JobConfig, *, cancel: bool = False) -> list[dict[str, Any]]:
    """Every job the log holds, with the service's state for the open ones; with ``cancel``,
    the open ones are cancelled and recorded as failed."""
    log = BatchLog(open_db(job.sink.state_uri, sink_storage_options(job)),
                   job.sink.batches_table)
    rows = log.all()
    open_rows = [r for r in rows if r["status"] in OPEN and r["name"]]
    if not open_rows:
        return rows
    async with embedding_client(job) as client:
        api = BatchApi(client)
        for row in open_rows:
            info = await api.get(row["name"])
            row["service_state"] = info.state
            if cancel and not info.done:
                await api.cancel(row["name"])
                log.set(row["display_name"], status=FAILED)
                row["status"], row["service_state"] = FAILED, "BATCH_STATE_CANCELLED"
    return rows
