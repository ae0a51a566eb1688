"""The Connector protocol: what every source (local disk, S3, ...) offers the pipeline.

A connector lists objects with the metadata needed to tell what changed (size, mtime and, where
the store knows it without a read, a version such as an ETag), and reads one object's bytes.
Listing is lazy and in ``uri`` order: Arrow batches of :data:`LISTING_SCHEMA`, never the whole
listing in memory (the listing stage diffs them against the manifest as two sorted streams). A
listed entry that cannot be used (a broken link, a link out of the root) is a row with a
``reject_reason``, never dropped. Blocking I/O is fine here: the runner calls connectors from
worker threads.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import islice
from typing import Any, Protocol

import pyarrow as pa

from connectors.blob import Blob
from pipeline.records import Reject, SourceObject

LISTING_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("version", pa.string()),  # where the listing knows it (an S3 ETag)
    pa.field("size", pa.int64()),
    pa.field("mtime", pa.timestamp("us", tz="UTC")),
    pa.field("reject_reason", pa.string()),  # set: the entry cannot be used (a FIFO, ...)
    pa.field("reject_message", pa.string()),
])
LISTING_BATCH = 4096


class Connector(Protocol):
    # Whether reading an object waits (on a network, a store, a FUSE daemon) rather than being
    # CPU work under the GIL (a local disk's page cache): groups of small files are read in
    # parallel only where reads wait.
    reads_wait: bool

    def list(self) -> Iterator[SourceObject | Reject]:
        """Every object under the source, one at a time, in ``uri`` order."""
        ...

    def list_batches(self) -> Iterator[pa.RecordBatch]:
        """The same listing as Arrow batches of :data:`LISTING_SCHEMA` (what the run uses)."""
        ...

    def read(self, obj: SourceObject) -> bytes:
        """The object's bytes. Raises ConnectorError (TransientConnectorError when retryable)."""
        ...

    def fetch(self, obj: SourceObject) -> Blob:
        """The object once, as a blob the caller closes: a large one is never held in memory
        whole. Raises as :meth:`read` does."""
        ...

    def ranged(self, obj: SourceObject) -> Blob:
        """The object as a blob read by range as its readers ask (``plan`` reads a media
        file's header, not its body); where reading is cheap (local disk), :meth:`fetch`."""
        ...

    def stat(self, key: str) -> SourceObject | None:
        """One object by key (None if absent): for files that travel with another (sidecars)."""
        ...

    def names_in(self, folder: str) -> frozenset[str]:
        """Names of the objects directly in ``folder`` ('' for the root), to find siblings."""
        ...


def content_version(data: bytes | Blob) -> str:
    """A version for stores that have none: the content hash."""
    digest = data.sha256() if isinstance(data, Blob) else hashlib.sha256(data).hexdigest()
    return "sha256:" + digest[:32]


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob over '/'-separated keys: ``**`` spans folders, ``*`` and ``?`` do not."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def key_selected(key: str, include: list[str], exclude: list[str]) -> bool:
    return any(glob_regex(p).match(key) for p in include) and not any(
        glob_regex(p).match(key) for p in exclude
    )


def listing_batches(entries: Iterable[SourceObject | Reject],
                    size: int = LISTING_BATCH) -> Iterator[pa.RecordBatch]:
    """A connector's per-object listing as :data:`LISTING_SCHEMA` batches."""
    it = iter(entries)
    while chunk := list(islice(it, size)):
        objs = [e.source if isinstance(e, Reject) else e for e in chunk]
        rejects = [e if isinstance(e, Reject) else None for e in chunk]
        yield pa.RecordBatch.from_arrays([
            pa.array([o.uri for o in objs], pa.string()),
            pa.array([o.key for o in objs], pa.string()),
            pa.array([o.version for o in objs], pa.string()),
            pa.array([o.size for o in objs], pa.int64()),
            pa.array([o.mtime for o in objs], pa.timestamp("us", tz="UTC")),
            pa.array([r.reason if r else None for r in rejects], pa.string()),
            pa.array([r.message if r else None for r in rejects], pa.string()),
        ], schema=LISTING_SCHEMA)


# A listing row without a modification time (a store that gives none)
EPOCH = datetime.fromtimestamp(0, tz=UTC)


_US = pa.timestamp("us", tz="UTC")


def datetimes(column: pa.Array | pa.ChunkedArray) -> list[datetime | None]:
    """A timestamp column's values (UTC), built from their microseconds: Arrow's own
    ``to_pylist`` takes ~2.4 us a value, this ~0.4 (it runs for every file to do)."""
    micros = column.cast(_US).cast(pa.int64()).to_pylist()
    return [None if us is None else EPOCH + timedelta(microseconds=us) for us in micros]


def pylists(table: pa.RecordBatch | pa.Table, names: Iterable[str]) -> list[list[Any]]:
    """The columns ``names`` as Python lists, timestamps by :func:`datetimes`."""
    return [datetimes(col) if pa.types.is_timestamp(col.type) else col.to_pylist()
            for col in map(table.column, names)]


def listed_objects(batch: pa.RecordBatch | pa.Table) -> Iterator[SourceObject | Reject]:
    """Rows of a listing batch as records (for the few that need Python: files to read)."""
    cols = pylists(batch, LISTING_SCHEMA.names)
    for uri, key, version, size, mtime, reason, message in zip(*cols, strict=True):
        obj = SourceObject(uri, key, size or 0, mtime or EPOCH, version)
        yield obj if reason is None else Reject(obj, None, reason, message or reason)
