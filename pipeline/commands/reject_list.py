"""The ``rejects`` command's work: the job's rejected files and parts, with their messages and
what to do about each reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors.sink_options import sink_storage_options
from pipeline.config import ArrowSinkConfig, JobConfig
from pipeline.errors import ConfigError, NotRunYet, RejectReason, SinkError
from pipeline.sinks.lance import open_db, sql_str

# What an operator can do about each reason (a changed file is always tried again; an unchanged
# one only with `run --retry-rejects`).
FIXES = {
    RejectReason.CORRUPT: "the file is damaged or not what its name says: replace it with a "
                          "good copy (a changed file is tried again by the next run)",
    RejectReason.ENCRYPTED: "password-protected: remove the password (qpdf --decrypt) or "
                            "exclude it (source.exclude)",
    RejectReason.UNSUPPORTED: "a type the model does not take: convert it (PDF, PNG/JPEG, "
                              "MP3/WAV, MP4/MOV, text) or exclude it (source.exclude)",
    RejectReason.TOO_LONG: "longer than the model takes (audio 180 s, video 120 s): cut it "
                           "into shorter files, or raise validate.audio_max_s / video_max_s "
                           "if the model allows more",
    RejectReason.TOO_LARGE: "over the request size limit: shrink or split it",
    RejectReason.UNREADABLE: "could not be read (permissions, a file that vanished): fix "
                             "access; it is tried again by every run",
    RejectReason.EMPTY: "no content to embed: nothing to do, or exclude it",
    RejectReason.TIMEOUT: "validation took longer than validate.file_timeout_s: raise it, then "
                          "run --retry-rejects",
    RejectReason.API_REJECTED: "the API refused it (see the message): fix the file, or run "
                               "--retry-rejects if the API has changed",
}


def list_rejects(job: JobConfig, reason: str | None = None) -> list[dict[str, Any]]:
    """Every reject row of the job (``reason`` only), newest first, with its fix."""
    if reason is not None and reason not in RejectReason.ALL:
        raise ConfigError(f"--reason {reason!r}: not a reject reason; one of "
                          f"{', '.join(sorted(RejectReason.ALL))}")
    columns = ["uri", "key", "part", "reason", "message", "mime", "run_id", "rejected_at"]
    sink = job.sink
    try:
        if isinstance(sink, ArrowSinkConfig):
            import pyarrow.dataset as ds

            folder = Path(sink.path) / "_rejects"
            if not Path(sink.path).is_dir():
                raise NotRunYet(f"nothing at {sink.path}")
            if not folder.is_dir():
                return []
            data = ds.dataset(folder, format="parquet" if sink.format == "parquet" else "ipc")
            table = data.to_table(columns=columns,
                                  filter=None if reason is None else ds.field("reason") == reason)
        else:
            db = open_db(sink.uri, sink_storage_options(job))
            if sink.rejects_table not in db.list_tables().tables:
                raise NotRunYet(f"no table {sink.rejects_table!r} in {sink.uri}")
            query = db.open_table(sink.rejects_table).search().select(columns).limit(None)
            if reason is not None:
                query = query.where(f"reason = {sql_str(reason)}")
            table = query.to_arrow()
    except (OSError, ValueError, RuntimeError) as exc:
        raise SinkError(f"cannot read the rejects of {sink.uri}: {exc}") from exc
    rows: list[dict[str, Any]] = table.to_pylist()
    rows.sort(key=lambda r: (r["rejected_at"] is not None, r["rejected_at"], r["uri"]),
              reverse=True)
    for row in rows:
        row["fix"] = FIXES.get(row["reason"], "")
    return rows
