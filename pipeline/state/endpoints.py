"""The ``endpoints`` table: what each base URL a job called is known to serve, so a gateway is
probed once, not every night.

One row per API root (``{base_url}/v1beta``): whether it serves the Batch API, why we think so
(the probe's answer, in one line) and when it was asked. An answer older than
:data:`MAX_AGE` is asked again (a gateway may have been upgraded).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from pipeline.errors import SinkError
from pipeline.records import BatchSupport
from pipeline.sinks.lance import open_table, sql_str, upsert

ENDPOINTS_TABLE = "endpoints"
MAX_AGE = timedelta(days=7)

ENDPOINTS_SCHEMA = pa.schema([
    pa.field("base", pa.string(), nullable=False),
    pa.field("batch_api", pa.bool_()),
    pa.field("why", pa.string()),
    pa.field("checked", pa.timestamp("us", tz="UTC")),
])


class EndpointLog:
    def __init__(self, db: Any, table: str = ENDPOINTS_TABLE) -> None:
        self.table = open_table(db, table, ENDPOINTS_SCHEMA)

    def recall(self, base: str, now: datetime | None = None) -> BatchSupport | None:
        """The remembered answer for ``base``, if there is one younger than :data:`MAX_AGE`."""
        try:
            rows = self.table.search().where(f"base = {sql_str(base)}").to_arrow().to_pylist()
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"cannot read the endpoints table: {exc}") from exc
        if not rows or (now or datetime.now(UTC)) - rows[0]["checked"] > MAX_AGE:
            return None
        row = rows[0]
        when = f"{row['checked']:%Y-%m-%d}"
        return BatchSupport(bool(row["batch_api"]), f"{row['why']} (asked {when}, remembered)")

    def remember(self, base: str, support: BatchSupport) -> None:
        data = pa.table({"base": [base], "batch_api": [support.served], "why": [support.why],
                         "checked": [datetime.now(UTC)]}, schema=ENDPOINTS_SCHEMA)
        upsert(self.table, "base", data, "endpoints table")
