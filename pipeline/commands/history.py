"""The ``report`` command's data: a job's last runs with their figures, and its latest rejects.

Read from the job's ``runs`` and rejects tables (local or in an object store) without changing
them. The page is drawn by :mod:`pipeline.commands.report_page`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from connectors.sink_options import sink_storage_options
from pipeline.commands.reject_list import list_rejects
from pipeline.config import JobConfig
from pipeline.errors import NotRunYet
from pipeline.sinks.lance import open_db
from pipeline.state.runs import last_runs


@dataclass
class History:
    job: str
    model: str
    sink: str
    runs: list[dict[str, Any]]  # oldest first; reject_reasons as a dict
    rejects: list[dict[str, Any]]  # the newest first, at most the number asked for
    rejects_total: int

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "model": self.model, "sink": self.sink, "runs": self.runs,
                "rejects": self.rejects, "rejects_total": self.rejects_total}


def run_history(job: JobConfig, last: int = 30, rejects: int = 20) -> History:
    """The job's last ``last`` runs (oldest first) and its ``rejects`` newest rejects.
    Raises :class:`~pipeline.errors.NotRunYet` before the job's first run."""
    sink = job.sink
    db = open_db(sink.state_uri, sink_storage_options(job))
    if sink.runs_table not in db.list_tables().tables:
        raise NotRunYet(f"no run history ({sink.runs_table!r}) in {sink.state_uri}")
    runs = last_runs(db, sink.runs_table, last)
    for run in runs:
        run["reject_reasons"] = (json.loads(run["reject_reasons"])
                                 if run["reject_reasons"] else None)
        if run["wall_s"] is None and isinstance(run["finished"], datetime) \
                and isinstance(run["started"], datetime):  # a row of an older version
            run["wall_s"] = round((run["finished"] - run["started"]).total_seconds(), 3)
    try:
        latest = list_rejects(job)
    except NotRunYet:
        latest = []
    return History(job.name, job.embed.model, sink.uri, runs, latest[:rejects], len(latest))
