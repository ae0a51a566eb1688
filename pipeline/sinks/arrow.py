"""The Arrow output: a folder of Parquet (or Arrow IPC) files with the Lance sink's columns.

    <path>/part-<run_id>-<n>.parquet            the vectors: one file per flush
    <path>/_rejects/part-<run_id>-<n>.parquet   the rejects, beside them
    <path>/_state/                              manifest and run history (Lance)
    <path>/_reports/<run_id>.json               run reports

Readers see only the vectors in ``<path>``: pyarrow.dataset skips names starting with ``_`` or
``.``, and ``'<path>/*.parquet'`` (polars, duckdb) does not descend into folders.

Every file is written under a hidden temporary name and renamed into place, so a reader, or a
run killed mid-write, never sees half a file. Files are immutable once written, except that
rows going stale (a file's older version, files deleted from the source) are removed by
rewriting the files that hold them, again through a temporary file and a rename.

Where it differs from the Lance sink: a batch is appended, not merged on ``id``: a row is never
written twice because the manifest skips finished files and a resumed run skips the ids its
killed predecessor committed (read back by run id, from the file names); there are no table
versions to tag or check out; and stale rows are removed in a second step after the new rows
are written (a kill in between leaves them until the next run completes that file).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline.errors import SinkError
from pipeline.records import Reject, Vector
from pipeline.sinks.lance import (
    REJECTS_SCHEMA,
    first_per_key,
    moved_uris,
    rejects_table,
    vector_dims,
    vector_table,
    vectors_schema,
)

VECTORS = "."  # the vectors are the folder itself
REJECTS = "_rejects"


class ArrowSink:
    def __init__(self, path: str, fmt: str, dims: int, model: str,
                 columns: dict[str, str] | None = None) -> None:
        self.root = Path(path)
        self.format = fmt
        self.ext = ".parquet" if fmt == "parquet" else ".arrow"
        self.dims = dims
        self.model = model
        self.schema = vectors_schema(dims, columns)
        self.seq = 0
        try:
            for sub in (VECTORS, REJECTS):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create the output folder {self.root}: {exc}") from exc
        self._check_schema()

    def _files(self, sub: str) -> list[Path]:
        return sorted(p for p in (self.root / sub).glob(f"*{self.ext}") if p.name[0] not in "._")

    def _check_schema(self) -> None:
        files = self._files(VECTORS)
        if files:
            existing = self._read(files[0], None).schema
            size = vector_dims(existing)
            if size != self.dims:
                raise SinkError(f"{self.root} holds {size}-dimension vectors but the job asks for "
                                f"{self.dims}: write to another folder")

    # --- files --------------------------------------------------------------------------------

    def _read(self, path: Path, columns: list[str] | None) -> pa.Table:
        if self.format == "parquet":
            return pq.read_table(path, columns=columns)
        with ipc.open_file(path) as reader:
            table = reader.read_all()
        return table.select(columns) if columns else table

    def _write(self, sub: str, table: pa.Table, name: str | None = None) -> None:
        """Write ``table`` as one file, atomically (temporary name, then rename)."""
        folder = self.root / sub
        tmp = folder / f".tmp-{secrets.token_hex(8)}"
        target = folder / (name or f"part-{self._run_id}-{self.seq:06d}{self.ext}")
        try:
            if self.format == "parquet":
                pq.write_table(table, tmp, compression="zstd")
            else:
                with ipc.new_file(tmp, table.schema) as writer:
                    writer.write_table(table)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SinkError(f"writing {target} failed: {exc}") from exc

    # --- the sink interface (as LanceSink) ----------------------------------------------------

    def write(self, vectors: Sequence[Vector], rejects: Sequence[Reject], run_id: str,
              replaced: dict[str, tuple[set[str], set[str]]]) -> None:
        now = datetime.now(UTC)
        self._run_id = run_id
        if vectors:
            self.seq += 1
            self._write(VECTORS, vector_table(vectors, run_id, now, self.schema, self.dims,
                                                self.model))
        if rejects:
            self.seq += 1
            self._write(REJECTS, rejects_table(rejects, run_id, now))
        if replaced:
            self._drop(VECTORS, {u: keep for u, (keep, _) in replaced.items()})
            self._drop(REJECTS, {u: keep for u, (_, keep) in replaced.items()})

    def _drop(self, sub: str, keep: dict[str, set[str]] | None, uris: set[str] | None = None
              ) -> None:
        """Rewrite the files holding stale rows: rows of ``keep``'s uris whose id is not kept,
        or every row of ``uris``."""
        def stale(row_id: str, uri: str) -> bool:
            if uris is not None and uri in uris:
                return True
            return keep is not None and uri in keep and row_id not in keep[uri]

        for path in self._files(sub):
            ids = self._read(path, ["id", "uri"])
            mask = [not stale(i, u) for i, u in zip(ids.column("id").to_pylist(),
                                                     ids.column("uri").to_pylist(), strict=True)]
            if all(mask):
                continue
            table = self._read(path, None).filter(pa.array(mask))
            if table.num_rows:
                self._write(sub, table, path.name)
            else:
                path.unlink()

    def delete_uris(self, uris: Iterable[str]) -> None:
        gone = set(uris)
        if gone:
            self._drop(VECTORS, None, gone)
            self._drop(REJECTS, None, gone)

    def committed_ids(self, run_ids: list[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for run_id in run_ids:
            for path in (self.root / VECTORS).glob(f"part-{run_id}-*{self.ext}"):
                rows = self._read(path, None)
                keys = (rows.column("content_key").to_pylist()
                        if "content_key" in rows.column_names else [None] * rows.num_rows)
                out.update(zip(rows.column("id").to_pylist(), keys, strict=True))
        return out

    def find_keys(self, keys: Sequence[str]) -> dict[str, tuple[np.ndarray, int]]:
        """Stored vectors of these content keys (the files have no index: a scan)."""
        if not keys or not self._files(VECTORS):
            return {}
        rows = self.dataset().to_table(
            columns=["content_key", "vector", "tokens"],
            filter=(pc.field("content_key").isin(list(keys))
                    & (pc.field("model") == self.model)))
        return first_per_key(rows, self.dims)

    def rehomed(self, uris: list[str], run_id: str) -> set[str]:
        """Those of ``uris`` every row of which has its content written by this run under
        another uri (see :meth:`LanceSink.rehomed`)."""
        if not uris or not self._files(VECTORS):
            return set()
        rows = self.dataset().to_table(columns=["uri", "content_key"],
                                       filter=pc.field("uri").isin(uris)).to_pylist()
        keys = list({r["content_key"] for r in rows if r["content_key"]})
        written = set(self.dataset().to_table(
            columns=["content_key"], filter=(pc.field("content_key").isin(keys)
                                             & (pc.field("run_id") == run_id)))
            ["content_key"].to_pylist()) if keys else set()
        return moved_uris(rows, written)

    def version(self) -> int:
        return len(self._files(VECTORS))

    def tag(self, name: str) -> None:
        """Files have no versions to name: nothing to do (see the module docstring)."""

    def upkeep(self, compact: bool, index_min_rows: int | None, index_type: str,
               id_index_min_rows: int | None = None, keep_versions: int = 7,
               keep_days: float = 7.0) -> list[str]:
        return []

    def dataset(self, sub: str = VECTORS) -> Any:
        return ds.dataset(self.root / sub, format="parquet" if self.format == "parquet"
                          else "ipc", schema=self.schema if sub == VECTORS else REJECTS_SCHEMA)
