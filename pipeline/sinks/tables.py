"""Lance tables: opening a database (its caches and I/O threads bounded), creating and
upgrading a table's schema, merging rows on a key, indexes, and a table's figures. All blocking."""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from connectors.s3_options import S3_HINTS, s3_error_code
from pipeline.errors import SinkError

# Lance compresses strings (FSST) by default. Hex digests, which use 16 byte values, give it
# little to take out and cost it ~3 us a row to try. Measured 2026-12-07 (b2af049), 20,000
# rows of a text run in 10 adds: the vectors table took 12.4-13.5 CPU-us a row, 8.4 without
# compressing id, version and content_key (64.1 -> 65.1 MB on disk); the manifest 3.8-3.9,
# 2.5 without compressing version and fingerprint (1.17 -> 1.57 MB). Names and paths (uri,
# key) keep it. A hint in the field's metadata, read when a table is created: tables made
# before it keep compressing.
UNCOMPRESSED = {"lance-encoding:compression": "none"}


def digest_field(name: str, *, nullable: bool = True) -> pa.Field:
    """A string column of hex digests (ids, versions, content keys): stored uncompressed."""
    return pa.field(name, pa.string(), nullable=nullable, metadata=UNCOMPRESSED)


def repeated(value: Any, type_: pa.DataType, n: int) -> pa.Array:
    """A column of ``n`` times ``value`` (a flush's run id and time), made once: a list of ``n``
    datetimes took ~0.22 us a row to convert."""
    return pa.repeat(pa.scalar(value, type_), n)


def index_on(table: Any, column: str) -> Any:
    """The table's index on ``column``, or None."""
    for index in table.list_indices():
        if column in (getattr(index, "columns", None) or []):
            return index
    return None


def keep_btree(table: Any, column: str, min_rows: int, rows: int | None = None) -> list[str]:
    """A BTREE index on ``column`` once the table has ``min_rows``. Rows added since the index
    was built are scanned, so it is rebuilt once they are a fifth of the table."""
    rows = table.count_rows() if rows is None else rows
    if rows < max(min_rows, 1):
        return []
    current = index_on(table, column)
    if current is not None:
        stats = table.index_stats(current.name)
        if (getattr(stats, "num_unindexed_rows", 0) or 0) <= rows // 5:
            return []
    from lancedb.index import BTree

    table.create_index(column, config=BTree(), replace=True)
    return [f"BTREE index on {column} ({rows:,} rows)"]


def sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def index_config(kind: str) -> Any:
    from lancedb.index import HnswPq, HnswSq, IvfFlat, IvfPq

    configs = {"IVF_PQ": IvfPq, "IVF_HNSW_SQ": HnswSq, "IVF_HNSW_PQ": HnswPq, "IVF_FLAT": IvfFlat}
    return configs[kind](distance_type="cosine")


def merge_rows(table: Any, rows: pa.Table | None, stale: list[str], *,
               new: bool = False) -> None:
    """Merge ``rows`` on ``id`` and delete the ``stale`` ids, in one commit (``new``: no row
    has an id the table holds, none is stale: appended)."""
    if rows is None:
        if stale:
            table.delete(id_in(stale))
        return
    if new and not stale:
        table.add(rows)
        return
    merge = table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
    if stale:
        merge = merge.when_not_matched_by_source_delete(id_in(stale))
    merge.execute(rows)


def vector_dims(schema: pa.Schema) -> int | None:
    """The dimensions of the ``vector`` column of a table's (or a file's) schema."""
    return getattr(schema.field("vector").type, "list_size", None)


def first_model(table: Any) -> str | None:
    """The model of a table's first row (None when it is empty)."""
    models = table.search().select(["model"]).limit(1).to_arrow()["model"].to_pylist()
    return models[0] if models else None


def table_figures(table: Any, db_uri: str) -> dict[str, Any]:
    """What a vectors table is: its version and how many it keeps, fragments, rows, bytes
    (live, and on disk where it is a local folder), tags, model and dimensions."""
    try:
        stats = table.stats()
        frags = stats.get("fragment_stats") or {}
        return {"version": int(table.version), "versions": len(table.list_versions()),
                "fragments": int(frags.get("num_fragments") or 0),
                "rows": int(stats.get("num_rows") or 0),
                "live_bytes": int(stats.get("total_bytes") or 0),
                "disk_bytes": _folder_bytes(db_uri, table.name), "tags": len(table.tags.list()),
                "model": first_model(table), "dims": vector_dims(table.schema)}
    except (OSError, ValueError, RuntimeError) as exc:
        raise SinkError(f"cannot read the figures of {table.name!r} in {db_uri}: {exc}") from exc


def upsert(table: Any, key: str, rows: pa.Table, what: str, *, new: bool = False) -> None:
    """Insert ``rows``, replacing those with the same ``key``, in one commit (``new``: none of
    their keys is in the table: appended)."""
    try:
        if new:
            table.add(rows)
        else:
            (table.merge_insert(key).when_matched_update_all().when_not_matched_insert_all()
             .execute(rows))
    except (OSError, ValueError, RuntimeError) as exc:
        raise SinkError(f"cannot write the {what}: {exc}") from exc


class Hashes:
    """A set of 64-bit hashes in ~10 bytes each, not ~70 as Python ints in a set: a sorted
    numpy array, and the latest ones in a set until they are an eighth as many (then merged
    in: each hash is sorted about eight times, ~0.5 s of CPU over a million)."""

    MERGE_AT = 65_536

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.int64)
        self._latest: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._latest)

    def contains(self, hashes: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which of ``hashes`` are in the set."""
        found = self._in_sorted(hashes)
        if self._latest:
            latest = self._latest
            found |= np.fromiter((h in latest for h in hashes.tolist()), np.bool_, len(hashes))
        return found

    def add(self, hashes: npt.NDArray[np.int64]) -> None:
        # one already merged stays out of the set, or len() would count it twice
        self._latest.update(hashes[~self._in_sorted(hashes)].tolist())
        if len(self._latest) > max(self.MERGE_AT, len(self._sorted) // 8):
            latest = np.fromiter(self._latest, np.int64, len(self._latest))
            self._sorted, self._latest = _sorted_once(np.concatenate([self._sorted, latest])), set()

    def _in_sorted(self, hashes: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        if not len(self._sorted):
            return np.zeros(len(hashes), dtype=np.bool_)
        at = np.searchsorted(self._sorted, hashes).clip(max=len(self._sorted) - 1)
        found: npt.NDArray[np.bool_] = self._sorted[at] == hashes
        return found


def _sorted_once(values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """``values`` sorted, each once (numpy's ``unique`` hashes: ten times slower here)."""
    values = np.sort(values)
    if len(values) < 2:
        return values
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


def hashes_of(values: Iterable[str], count: int = -1) -> npt.NDArray[np.int64]:
    return np.fromiter(map(hash, values), np.int64, count)


class Written:
    """What a run wrote into a table that was empty when it opened, while that is all the table
    holds (the job's lock keeps other writers out). Rows whose merge keys (ids, uris) are not
    among those written are new: appended, since a merge joins them against every key of the
    table (three times the CPU of an append). A content key not among those written is not in
    the table: reuse looks it up without a query (~1 ms of CPU per chunk of items). Kept for the
    first :data:`KEPT` rows, as hashes (:class:`Hashes`, ~10 bytes a key): a hash two keys
    share, or one recorded before a commit that failed, costs a merge or a query, never a
    duplicate or a missed row. A longer backfill queries and merges from there on, as a nightly
    run does."""

    KEPT = 1_000_000

    def __init__(self) -> None:
        self.ids = Hashes()
        self.keys = Hashes()

    @classmethod
    def if_empty(cls, table: Any) -> Written | None:
        return cls() if table.count_rows() == 0 else None

    @property
    def full(self) -> bool:
        return len(self.ids) > self.KEPT

    def add(self, ids: list[str], keys: Iterable[str] = ()) -> bool:
        """Record rows about to be written; whether they are all new (no id written before,
        none twice among them)."""
        hashed = hashes_of(ids, len(ids))
        new = (bool(ids) and len(_sorted_once(hashed)) == len(ids)
               and not self.ids.contains(hashed).any())
        self.ids.add(hashed)
        self.keys.add(hashes_of(keys))
        return new

    def may_hold(self, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` the table may hold (all the others it does not)."""
        keys = list(keys)
        found = self.keys.contains(hashes_of(keys, len(keys)))
        return [k for k, hit in zip(keys, found.tolist(), strict=True) if hit]


def naive(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(tzinfo=None) if at.tzinfo else at


def _folder_bytes(db_uri: str, table: str) -> int | None:
    """Bytes on disk under a local table's folder (None for an object store)."""
    if "://" in db_uri and not db_uri.startswith("file://"):
        return None
    root = Path(db_uri.removeprefix("file://")) / f"{table}.lance"
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0


def id_in(ids: list[str]) -> str:
    return f"id IN ({', '.join(sql_str(i) for i in ids)})"


def preload() -> None:
    """Import lancedb now (about 2 s), before a run's clock starts, rather than mid-run."""
    import lancedb  # noqa: F401


# Lance's caches of index pages and table versions default to gigabytes; a run reads each index
# and version a few times at most, and its memory must not grow with the tables.
INDEX_CACHE_BYTES = 64 << 20


METADATA_CACHE_BYTES = 64 << 20


# Lance's I/O threads, for tables on a local disk. Its default reads ahead in parallel, and the
# read-ahead grows with the table: scanning a 20M-row manifest peaked at 504 MB with it, 317 MB
# with two threads, in the same time. Lance reads the variable once, before its first I/O; a
# LANCE_IO_THREADS of the user's own wins, and object stores keep Lance's default.
LOCAL_IO_THREADS = "2"


def open_db(uri: str, storage_options: dict[str, str] | None = None) -> Any:

    import lancedb  # 2 s to import: only when a table is really opened

    if "://" not in uri:
        os.environ.setdefault("LANCE_IO_THREADS", LOCAL_IO_THREADS)
    try:
        db = lancedb.connect(uri, storage_options=storage_options, session=lancedb.Session(
            index_cache_size_bytes=INDEX_CACHE_BYTES, metadata_cache_size_bytes=METADATA_CACHE_BYTES))
        db.list_tables()  # fail here, clearly, if the store cannot be reached
        return db
    except (OSError, ValueError, RuntimeError) as exc:
        text = str(exc)
        for key in ("aws_secret_access_key", "aws_session_token"):
            secret = (storage_options or {}).get(key)
            if secret:
                text = text.replace(secret, "[REDACTED]")
        code = s3_error_code(text)
        reason = S3_HINTS.get(code or "") or (
            "the endpoint cannot be reached" if "connect" in text.lower() else
            text.splitlines()[0][:200])
        raise SinkError(f"cannot open the Lance database at {uri}: {reason}") from None


def _sql_type(t: pa.DataType) -> str | None:
    if pa.types.is_string(t):
        return "STRING"
    if pa.types.is_int32(t):
        return "INT"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP"
    return None


def open_table(db: Any, name: str, schema: pa.Schema) -> Any:
    """Open ``name``, creating it empty with ``schema`` if it does not exist. A table made by
    an older version gets the columns it lacks, empty for its old rows."""
    try:
        if name not in db.list_tables().tables:
            return db.create_table(name, schema=schema, exist_ok=True)
        table = db.open_table(name)
        present = set(table.schema.names)
        missing = {f.name: f"CAST(NULL AS {_sql_type(f.type)})" for f in schema
                   if f.name not in present and f.nullable and _sql_type(f.type)}
        if missing:
            table.add_columns(missing)
        return table
    except (OSError, ValueError, RuntimeError) as exc:
        raise SinkError(f"cannot open table {name!r} in {db.uri}: {exc}") from exc
