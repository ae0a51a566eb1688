"""Reading a job's output: nearest-neighbour search over the vectors, and table status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors.sink_options import sink_object_store, sink_storage_options
from pipeline.config import ArrowSinkConfig, JobConfig
from pipeline.errors import ConfigError, NotRunYet, SinkError
from pipeline.gemini.endpoint import embedding_client
from pipeline.gemini.tasks import TaskStyle
from pipeline.memory import in_thread
from pipeline.models import model_spec
from pipeline.records import Part
from pipeline.sinks.lance import first_model, open_db, sql_str, table_figures, vector_dims
from pipeline.state.lock import JobLock
from pipeline.state.runs import RUNNING, last_runs
from pipeline.state.tables import TableLog, TableSpace


def _where(row: dict[str, Any]) -> str:
    if row.get("page_start") is not None:
        return f"pages {row['page_start']}-{row['page_end']}"
    if row.get("char_start") is not None:
        return f"chars {row['char_start']}-{row['char_end']}"
    if row.get("time_start_s") is not None:
        return f"{row['time_start_s']:.1f}-{row['time_end_s']:.1f} s"
    return "whole file"


def _query_part(job: JobConfig, path: Path) -> Part:
    """A query file validated like a document (sniffed, converted if needed): its first item."""
    from datetime import UTC, datetime

    from connectors.base import content_version
    from pipeline.records import Item, SourceObject
    from pipeline.validate import Validator

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the query file: {exc.strerror}") from exc
    obj = SourceObject(path.resolve().as_uri(), path.name, len(data), datetime.now(UTC),
                       content_version(data))
    for entry in Validator(job).fit(obj, data):
        if isinstance(entry, Item):
            return entry.parts[0]
        raise ConfigError(f"{path}: cannot be used as a query: {entry.message}")
    raise ConfigError(f"{path}: nothing to embed in the query file")


def _bad_where(where: str, exc: Exception) -> ConfigError:
    first = str(exc).strip().splitlines()[0][:300]
    return ConfigError(f"--where {where!r} cannot be used: {first}")


def _same_model(table: Any, job: JobConfig) -> None:
    """Refuse (unpaid) a search whose query model no row of the table shares."""
    model = job.embed.model
    if table.count_rows() and not table.count_rows(f"model = {sql_str(model)}"):
        raise ConfigError(
            f"the table {job.sink.table!r} holds vectors of {first_model(table)}, not {model} "
            f"(embed.model): a query of one model cannot be compared with "
            "vectors of another; search with the model the table was written with")


def _open_vectors(job: JobConfig) -> tuple[Any, TableSpace | None]:
    """The live table, and the settings its vectors were made with (None: not recorded)."""
    db = open_db(job.sink.uri, sink_storage_options(job))
    if job.sink.table not in db.list_tables().tables:
        raise NotRunYet(f"no table {job.sink.table!r} in {job.sink.uri}")
    return db.open_table(job.sink.table), TableLog(db, read_only=True).space(job.sink.table)


async def search(job: JobConfig, query: str | None, *, k: int = 5, where: str | None = None,
                 file: Path | None = None) -> list[dict[str, Any]]:
    """The ``k`` rows nearest to a text query, a query file (image, audio, ...), or both."""
    spec = model_spec(job.embed.model)
    parts: list[Part] = [Part(text=query)] if query else []
    if file is not None:
        parts.append(_query_part(job, file))
    if not parts:
        raise ConfigError("search needs a query text or --file")
    if k < 1:
        raise ConfigError(f"-k must be 1 or more (got {k})")
    # The table first: a search before any run must not pay for the query's embedding.
    table: Any = None
    if isinstance(job.sink, ArrowSinkConfig):
        if not Path(job.sink.path).is_dir():
            raise NotRunYet(f"no vectors in {job.sink.path}")
    else:
        table, space = await in_thread(_open_vectors, job)
        if space is not None and space.fingerprint != job.fingerprint():
            # An upgrade under way (or the job changed since): the table answers in its own
            # space, so the query is embedded as its vectors were.
            job = space.job_for_queries(job)
            spec = model_spec(job.embed.model)
        held = vector_dims(table.schema)
        if held is not None and held != job.embed.output_dimensionality:
            raise ConfigError(
                f"the table {job.sink.table!r} holds vectors of {held} dimensions and the job "
                f"asks for {job.embed.output_dimensionality} (embed.output_dimensionality): "
                "search with the settings the table was written with, or run the job to "
                "re-embed it")
        await in_thread(_same_model, table, job)
    async with embedding_client(job) as client:
        response = await client.embed(TaskStyle.for_job(job).query(tuple(parts)))
    vector = response.vectors[0]
    if not spec.is_normalised(job.embed.output_dimensionality):
        vector = vector / max(float((vector**2).sum()) ** 0.5, 1e-12)

    def nearest() -> list[dict[str, Any]]:
        if isinstance(job.sink, ArrowSinkConfig):
            return _arrow_nearest(job.sink, vector, k, where)
        q = table.search(vector.tolist()).distance_type("cosine").limit(k)
        # A vector of another model is not comparable with this query, whatever its score.
        same = f"model = {sql_str(job.embed.model)}"
        q = q.where(f"({where}) AND {same}" if where else same, prefilter=True)
        try:
            rows: list[dict[str, Any]] = q.select(
                [c for c in table.schema.names if c != "vector"] + ["_distance"]).to_list()
        except (ValueError, RuntimeError, OSError) as exc:
            if where:  # most likely the filter: a column that is not there, a typo
                raise _bad_where(where, exc) from None
            raise SinkError(f"search failed: {exc}") from exc
        for row in rows:
            row["score"] = 1.0 - float(row.pop("_distance"))
            row["where"] = _where(row)
        return rows

    return await in_thread(nearest)


_COLUMNS = ["uri", "key", "part", "modality", "mime", "text", "page_start", "page_end",
            "char_start", "char_end", "time_start_s", "time_end_s"]


def _arrow_nearest(sink: ArrowSinkConfig, vector: Any, k: int,
                   where: str | None) -> list[dict[str, Any]]:
    """Exact search over Parquet/IPC files, one record batch at a time (memory stays flat);
    ``--where`` is SQL evaluated by polars on each batch."""
    import heapq

    import numpy as np
    import polars as pl
    import pyarrow.dataset as ds

    folder = Path(sink.path)
    if not folder.is_dir():
        raise NotRunYet(f"no vectors in {sink.path}")
    dataset = ds.dataset(folder, format="parquet" if sink.format == "parquet" else "ipc")
    query = np.asarray(vector, dtype=np.float32)
    best: list[tuple[float, int, dict[str, Any]]] = []
    seen = 0
    for batch in dataset.to_batches(columns=[*_COLUMNS, "vector"]):
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        if where:
            try:
                frame = pl.SQLContext(t=frame).execute(f"SELECT * FROM t WHERE {where}",
                                                        eager=True)
            except pl.exceptions.PolarsError as exc:
                raise _bad_where(where, exc) from None
        if frame.height == 0:
            continue
        matrix = np.stack(frame["vector"].to_list()).astype(np.float32)
        norms = np.linalg.norm(matrix, axis=1) * max(float(np.linalg.norm(query)), 1e-12)
        scores = matrix @ query / np.maximum(norms, 1e-12)
        for row, score in zip(frame.drop("vector").iter_rows(named=True), scores, strict=True):
            seen += 1
            item = (float(score), seen, row)
            if len(best) < k:
                heapq.heappush(best, item)
            else:
                heapq.heappushpop(best, item)
    out = []
    for score, _, row in sorted(best, key=lambda t: -t[0]):
        row["score"] = score
        row["where"] = _where(row)
        out.append(row)
    return out


def table_status(job: JobConfig, last: int = 10) -> dict[str, Any]:
    """Row counts of the job's tables, files by status, and the last runs."""
    db = open_db(job.sink.state_uri, sink_storage_options(job))
    names = set(db.list_tables().tables)
    sink = job.sink
    counts = {name: db.open_table(name).count_rows() if name in names else None
              for name in (sink.table, sink.rejects_table, sink.manifest_table)}
    if isinstance(sink, ArrowSinkConfig):
        import pyarrow.dataset as ds

        for name, sub in (("vectors", "."), ("rejects", "_rejects")):
            folder = Path(sink.path) / sub
            counts[name] = (ds.dataset(folder, format="parquet" if sink.format == "parquet"
                                       else "ipc").count_rows() if folder.is_dir() else None)
    files: dict[str, int] = {}
    if sink.manifest_table in names:
        statuses = db.open_table(sink.manifest_table).to_arrow().column("status").to_pylist()
        for st in statuses:
            files[st] = files.get(st, 0) + 1
    runs: list[dict[str, Any]] = []
    if sink.runs_table in names:
        runs = last_runs(db, sink.runs_table, last)
    pending = None
    if runs and runs[-1]["status"] not in ("finished", None):
        latest = runs[-1]
        if latest["status"] == RUNNING and JobLock(
                sink.uri, "status", job.name, store=sink_object_store(job)).live_run() \
                != latest["run_id"]:
            latest["status"] = "killed"  # no live process holds its lock: marked by the next run
        pending = _pending(db.open_table(sink.manifest_table) if sink.manifest_table in names
                           else None, latest)
    table = (table_figures(db.open_table(sink.table), db.uri)
             if not isinstance(sink, ArrowSinkConfig) and sink.table in names else None)
    return {"uri": sink.uri, "rows": counts, "files": files, "table": table, "runs": runs,
            "pending": pending}


def _pending(manifest: Any, run: dict[str, Any]) -> dict[str, Any]:
    """What the last run, unfinished, left to do: the files its listing found new or changed
    less those it completed. A run killed before its listing finished never said (None)."""
    todo = (run.get("files_new") or 0) + (run.get("files_changed") or 0)
    if not run.get("files_seen"):
        return {"run_id": run["run_id"], "status": run["status"], "files": None}
    done = run.get("files_done") or 0
    if run["status"] != "finished" and manifest is not None:
        # killed, or failed part-way (a write that failed): its row may count files whose
        # rows never landed; what the manifest holds under its run id is what it completed
        done = manifest.count_rows(f"run_id = {sql_str(run['run_id'])}")
    return {"run_id": run["run_id"], "status": run["status"], "files": max(0, todo - done)}
