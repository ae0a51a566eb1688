"""The manifest: what the job has done with every source object, so a run only does what changed.

Stored as the table ``files`` (``sink.manifest_table``) in the same Lance database as the vectors,
one row per source uri: its version, size, mtime, the job fingerprint it was embedded with, and
its status (``embedded`` with part counts, or ``rejected`` with the reason). A file's row is
written only after all its items are committed to the vectors table, so a run killed at any
moment leaves files either done (skipped next time) or not (redone; merging on ``id`` keeps
redone rows single).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from connectors.base import pylists
from pipeline.errors import SinkError
from pipeline.records import record
from pipeline.sinks.lance import keep_btree, open_table, sql_str, upsert
from pipeline.sinks.tables import Written, digest_field, repeated
from pipeline.state.lock import gone

MANIFEST_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("key", pa.string()),
    digest_field("version"),
    pa.field("size", pa.int64()),
    pa.field("mtime", pa.timestamp("us", tz="UTC")),
    digest_field("fingerprint"),
    pa.field("status", pa.string()),
    pa.field("parts", pa.int32()),
    pa.field("rejected_parts", pa.int32()),
    pa.field("reason", pa.string()),
    pa.field("companions", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("updated_at", pa.timestamp("us", tz="UTC")),
])

EMBEDDED = "embedded"
REJECTED = "rejected"
UNREADABLE = "unreadable"  # could not be read: nothing is known of its content; tried every run


@record
class FileState:
    uri: str
    key: str
    version: str
    size: int
    mtime: datetime
    fingerprint: str
    status: str
    parts: int
    rejected_parts: int
    reason: str | None
    companions: str | None = None

    def same_content(self, version: str, fingerprint: str) -> bool:
        """Read again, the file turned out as it was (only touched): nothing to embed."""
        return (self.version == version and self.status != UNREADABLE
                and self.fingerprint == fingerprint)


# What the diff reads of each manifest row, in this order (a FileState's fields).
DIFF_COLUMNS = ["uri", "key", "version", "size", "mtime", "fingerprint", "status", "parts",
                "rejected_parts", "reason", "companions"]
DIFF_SCHEMA = pa.schema([MANIFEST_SCHEMA.field(c).with_nullable(True) for c in DIFF_COLUMNS])
SORT_MEMORY = "100MB"  # DuckDB's share for sorting the manifest; beyond it the sort spills
URI_INDEX_MIN_ROWS = 50_000


SPILL_PREFIX = "embedpipe-sort-"


@contextmanager
def spill_folder() -> Iterator[str]:
    """A temporary folder for the manifest's sort to spill into (gigabytes at ten million
    files), named after this host and process. A run killed while sorting (SIGKILL: an OOM
    kill, a scheduler's timeout) cannot remove its own, so each sort first removes those of
    this host's processes that are gone."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())  # as a file name
    root = tempfile.gettempdir()
    own = re.compile(rf"{re.escape(SPILL_PREFIX + host)}-(\d+)-")
    try:
        names = os.listdir(root) if os.name == "posix" else []  # pids are checked by signal 0
    except OSError:
        names = []
    for name in names:
        found = own.match(name)
        if found and gone(socket.gethostname(), int(found.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{SPILL_PREFIX}{host}-{os.getpid()}-") as spill:
        yield spill


class Manifest:
    def __init__(self, db: Any, table: str, read_only: bool = False) -> None:
        self.table = db.open_table(table) if read_only else open_table(db, table, MANIFEST_SCHEMA)
        # a first run's files are new: their rows are appended, not merged on uri
        self._fresh = None if read_only else Written.if_empty(self.table)

    def count(self) -> int:
        try:
            return int(self.table.count_rows())
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"cannot read the manifest: {exc}") from exc

    @contextmanager
    def sorted_rows(self, batch_rows: int = 16_384) -> Iterator[Iterator[pa.RecordBatch]]:
        """Every row's :data:`DIFF_COLUMNS`, in ``uri`` order (UTF-8 byte order, the order
        S3 and the local connector list in), as Arrow batches.

        Lance keeps rows in the order they were written, so DuckDB sorts them: in bounded memory
        (``SORT_MEMORY``), spilling to a temporary folder beyond it. Ten million rows sort in
        about five seconds here; no Python object is made per row."""
        import duckdb  # only runs that diff need it

        try:
            present = set(self.table.schema.names)
            scan = (self.table.search().select([c for c in DIFF_COLUMNS if c in present])
                    .limit(None).to_batches(65_536))
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"cannot read the manifest: {exc}") from exc
        # A manifest older than a column reads it as empty.
        columns = ", ".join(c if c in present else f"NULL::VARCHAR AS {c}" for c in DIFF_COLUMNS)
        with spill_folder() as spill:
            con = duckdb.connect(config={"memory_limit": SORT_MEMORY, "threads": 1,
                                         "temp_directory": spill,
                                         "preserve_insertion_order": False})
            try:
                con.register("manifest", scan)
                reader = con.sql(f"SELECT {columns} FROM manifest ORDER BY uri").to_arrow_reader(
                    batch_rows)
                yield iter(reader)
            except duckdb.Error as exc:
                raise SinkError(f"cannot sort the manifest: {exc}") from exc
            finally:
                con.close()

    def load(self) -> dict[str, FileState]:
        """uri -> state of every row (for small manifests and tests: runs diff a sorted
        stream instead, see :meth:`sorted_rows`)."""
        out: dict[str, FileState] = {}
        with self.sorted_rows() as batches:
            for batch in batches:
                for state in states_of(batch):
                    out[state.uri] = state
        return out

    def upkeep(self, min_rows: int = URI_INDEX_MIN_ROWS) -> list[str]:
        """Keep a BTREE index on ``uri`` once the manifest is large: every flush merges on it
        (1,000 rows into 10M: 1.3-2.2 s and 1.9 GB without the index, 0.02 s with it)."""
        try:
            return keep_btree(self.table, "uri", min_rows)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SinkError(f"manifest upkeep failed: {exc}") from exc

    def record(self, states: Iterable[FileState], run_id: str) -> None:
        rows = list(states)
        if not rows:
            return
        now = datetime.now(UTC)
        table = pa.table({
            "uri": [s.uri for s in rows], "key": [s.key for s in rows],
            "version": [s.version for s in rows], "size": [s.size for s in rows],
            "mtime": [s.mtime for s in rows], "fingerprint": [s.fingerprint for s in rows],
            "status": [s.status for s in rows], "parts": [s.parts for s in rows],
            "rejected_parts": [s.rejected_parts for s in rows],
            "reason": [s.reason for s in rows], "companions": [s.companions for s in rows],
            "run_id": repeated(run_id, pa.string(), len(rows)),
            "updated_at": repeated(now, MANIFEST_SCHEMA.field("updated_at").type, len(rows)),
        }, schema=MANIFEST_SCHEMA)
        fresh = self._fresh
        new = fresh is not None and fresh.add([s.uri for s in rows])
        if fresh is not None and fresh.full:
            self._fresh = None
        upsert(self.table, "uri", table, "manifest", new=new)

    def forget(self, uris: list[str]) -> None:
        for start in range(0, len(uris), 500):
            chunk = uris[start : start + 500]
            try:
                self.table.delete(f"uri IN ({', '.join(sql_str(u) for u in chunk)})")
            except (OSError, ValueError, RuntimeError) as exc:
                raise SinkError(f"cannot update the manifest: {exc}") from exc


def states_of(rows: pa.RecordBatch | pa.Table) -> Iterator[FileState]:
    """Rows of :data:`DIFF_COLUMNS` as FileStates (only for the files a run must look at)."""
    cols = pylists(rows, DIFF_COLUMNS)
    for values in zip(*cols, strict=True):
        yield FileState(*values)


def mass_delete_refusal(gone: int, known: int, listed: int, max_fraction: float,
                        allowed: bool) -> str | None:
    """Why deleting the rows of ``gone`` of the ``known`` files must not happen, or None.

    An emptied or vanished source (an unmounted share, a wrong prefix, an ``include`` that
    matches nothing) looks exactly like every file deleted. Deleting more than
    ``run.max_delete_fraction`` of what the job knew, or all of it, waits for the operator to
    say so (``--allow-mass-delete`` or ``max_delete_fraction: 1.0``)."""
    if not gone or allowed or max_fraction >= 1.0:
        return None
    if gone < known and gone <= max_fraction * known:
        return None
    hint = (" (is the source mounted, and its prefix and include patterns right?)"
            if listed == 0 else "")
    return (f"refused to delete the rows of {gone:,} of the {known:,} files this job knew "
            f"({gone / max(known, 1):.0%}, over run.max_delete_fraction {max_fraction:g}): the "
            f"source listed {listed:,} files{hint}; nothing was deleted. If they were removed "
            "on purpose, run again with --allow-mass-delete")
