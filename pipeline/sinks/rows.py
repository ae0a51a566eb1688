"""The rows a Lance sink writes: the vectors and rejects tables' schemas (the job's metadata
columns included) and the Arrow tables of a flush, with their deterministic ids."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.records import Reject, Vector
from pipeline.sinks.tables import digest_field, repeated

TIMESTAMP = pa.timestamp("us", tz="UTC")
ARROW_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(),
                "bool": pa.bool_()}


SQL_TYPES = {"string": "STRING", "int64": "BIGINT", "float64": "DOUBLE", "bool": "BOOLEAN"}


def vectors_schema(dims: int, columns: dict[str, str] | None = None) -> pa.Schema:
    extra = [pa.field(name, ARROW_TYPES[kind]) for name, kind in (columns or {}).items()]
    return pa.schema([
        digest_field("id", nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("key", pa.string()),
        digest_field("version", nullable=False),
        pa.field("part", pa.int32()),
        pa.field("part_count", pa.int32()),
        pa.field("modality", pa.string()),
        pa.field("mime", pa.string()),
        pa.field("source_mime", pa.string()),
        pa.field("claimed_mime", pa.string()),
        pa.field("sidecar_uri", pa.string()),
        pa.field("page_start", pa.int32()),
        pa.field("page_end", pa.int32()),
        pa.field("char_start", pa.int64()),
        pa.field("char_end", pa.int64()),
        pa.field("time_start_s", pa.float64()),
        pa.field("time_end_s", pa.float64()),
        pa.field("text", pa.string()),
        pa.field("model", pa.string()),
        pa.field("dims", pa.int32()),
        pa.field("vector", pa.list_(pa.float32(), dims)),
        pa.field("tokens", pa.int32()),
        pa.field("run_id", pa.string()),
        pa.field("embedded_at", TIMESTAMP),
        # What was sent for the row (GeminiClient.content_key): resume adopts a row only for
        # an item whose request would be the same now. Empty in rows of older versions.
        digest_field("content_key"),
        *extra,
    ])


REJECTS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("key", pa.string()),
    pa.field("version", pa.string()),
    pa.field("part", pa.int32()),
    pa.field("reason", pa.string()),
    pa.field("message", pa.string()),
    pa.field("mime", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("rejected_at", TIMESTAMP),
])


def reject_id(uri: str, version: str | None, part: int | None) -> str:
    key = f"{uri}\x00{version or ''}\x00{'' if part is None else part}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def vector_table(vectors: Sequence[Vector], run_id: str, now: datetime, schema: pa.Schema,
                 dims: int, model: str) -> pa.Table:
    """The rows of ``vectors`` in the table schema (shared by the Lance and Arrow sinks)."""
    items = [v.item for v in vectors]
    flat = np.concatenate([v.values.astype(np.float32, copy=False) for v in vectors])
    columns: dict[str, Any] = {
        "id": [i.id for i in items],
        "uri": [i.source.uri for i in items],
        "key": [i.source.key for i in items],
        "version": [i.version for i in items],
        "part": [i.part for i in items],
        "part_count": [i.part_count for i in items],
        "modality": [str(i.modality) for i in items],
        "mime": [i.mime for i in items],
        "source_mime": [i.source_mime or i.mime for i in items],
        "claimed_mime": [i.claimed_mime for i in items],
        "sidecar_uri": [i.sidecar_uri for i in items],
        "page_start": [i.span.page_start for i in items],
        "page_end": [i.span.page_end for i in items],
        "char_start": [i.span.char_start for i in items],
        "char_end": [i.span.char_end for i in items],
        "time_start_s": [i.span.time_start_s for i in items],
        "time_end_s": [i.span.time_end_s for i in items],
        "text": [i.text for i in items],
        "model": repeated(model, pa.string(), len(items)),
        "dims": repeated(dims, pa.int32(), len(items)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dims),
        "tokens": [v.tokens for v in vectors],
        "run_id": repeated(run_id, pa.string(), len(items)),
        "embedded_at": repeated(now, TIMESTAMP, len(items)),
        "content_key": [v.key for v in vectors],
    }
    for name in schema.names:
        if name not in columns:  # user metadata columns
            columns[name] = [(i.columns or {}).get(name) for i in items]
    return pa.table(columns, schema=schema)


def rejects_table(rejects: Sequence[Reject], run_id: str, now: datetime) -> pa.Table:
    return pa.table({
        "id": [reject_id(r.source.uri, r.version, r.part) for r in rejects],
        "uri": [r.source.uri for r in rejects],
        "key": [r.source.key for r in rejects],
        "version": [r.version or "" for r in rejects],
        "part": [r.part for r in rejects],
        "reason": [r.reason for r in rejects],
        "message": [r.message for r in rejects],
        "mime": [r.mime for r in rejects],
        "run_id": repeated(run_id, pa.string(), len(rejects)),
        "rejected_at": repeated(now, TIMESTAMP, len(rejects)),
    }, schema=REJECTS_SCHEMA)
