"""``embedpipe plan``: what a run would do and cost, without calling the embedding API.

It lists the source, diffs it against the manifest (read only: nothing is created or written),
and runs the validator in plan mode over what is new or changed: the same items, spans and token
estimates as a run, but no PDF part written and no media cut or converted. Unchanged files are
not read. Costs come from the job's price table; the wall time is the quota's bound when the
job states its quotas.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors import connector_for
from connectors.base import content_version
from connectors.s3_options import sink_storage_options
from pipeline.companions import Companions
from pipeline.config import JobConfig
from pipeline.errors import ConnectorError, SinkError
from pipeline.models import cost_usd
from pipeline.records import Reject, SourceObject
from pipeline.sink import open_db
from pipeline.state import REJECTED, UNREADABLE, FileState, Manifest
from pipeline.validate import Validator


@dataclass
class Plan:
    files: Counter[str] = field(default_factory=Counter)  # new, changed, unchanged, deleted
    items: Counter[str] = field(default_factory=Counter)  # by modality
    tokens: Counter[str] = field(default_factory=Counter)
    pages: int = 0
    audio_s: float = 0.0
    video_s: float = 0.0
    rejects: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0

    def as_dict(self, job: JobConfig) -> dict[str, Any]:
        prices = job.embed.price_table()
        quota = job.embed.quota
        requests = sum(self.items.values())
        tokens = sum(self.tokens.values())
        minutes = [requests / quota.rpm if quota.rpm else 0.0,
                   tokens / quota.tpm if quota.tpm else 0.0]
        return {
            "job": job.name, "model": job.embed.model,
            "files": dict(self.files), "items": dict(self.items),
            "tokens": dict(self.tokens), "tokens_total": tokens,
            "pdf_pages": self.pages, "audio_seconds": round(self.audio_s, 1),
            "video_seconds": round(self.video_s, 1), "rejects": dict(self.rejects),
            "cost_usd": round(cost_usd(dict(self.tokens), prices), 6),
            "cost_usd_batch_api": round(cost_usd(dict(self.tokens), prices) / 2, 6),
            "prices_usd_per_million_tokens": prices,
            "quota_bound_minutes": round(max(minutes), 2) if any(minutes) else None,
            "days_by_requests_per_day": (math.ceil(requests / quota.rpd) if quota.rpd
                                         else None),
            "plan_wall_s": round(self.wall_s, 2),
        }


def _previous(job: JobConfig) -> dict[str, FileState]:
    """The manifest if the job has run before; never creates anything."""
    uri = job.sink.state_uri
    if "://" not in uri and not (Path(uri) / f"{job.sink.manifest_table}.lance").exists():
        return {}  # never ran: no need to load Lance at all
    try:
        db = open_db(uri, sink_storage_options(job))
        if job.sink.manifest_table not in db.list_tables().tables:
            return {}
        return Manifest(db, job.sink.manifest_table, read_only=True).load()
    except SinkError:
        return {}


# One validator per worker process (parsing PDFs and measuring media is CPU work: processes
# use every core where threads would share one).
_worker: dict[str, Any] = {}


def _init(job: JobConfig, retry_rejects: bool) -> None:
    connector = connector_for(job)
    _worker.update(job=job, connector=connector, validator=Validator(job),
                   companions=Companions(connector, job.source.sidecar, job.source.metadata),
                   fingerprint=job.fingerprint(), retry_rejects=retry_rejects)


Planned = tuple[str, str, int, int, float]  # (kind, modality or reason, tokens, pages, seconds)


def _plan_one(entry: tuple[SourceObject, FileState | None]) -> list[Planned] | None:
    """A file's planned items as small tuples, or None when it is only touched."""
    w = _worker
    obj, prev = entry
    try:
        data = w["connector"].read(obj)
    except ConnectorError:
        return [("reject", "unreadable", 0, 0, 0.0)]
    version = obj.version or content_version(data)
    extras = None
    if w["companions"].active:
        version, extras = w["companions"].read(obj, version)
    if (prev is not None and prev.version == version and prev.status != UNREADABLE
            and prev.fingerprint == w["fingerprint"] and not w["retry_rejects"]):
        return None
    out: list[Planned] = []
    for item in w["validator"].plan(obj.with_version(version), data, extras):
        if isinstance(item, Reject):
            out.append(("reject", item.reason, 0, 0, 0.0))
            continue
        span = item.span
        pages = (span.page_end - span.page_start + 1
                 if span.page_start is not None and span.page_end is not None else 0)
        seconds = (span.time_end_s - span.time_start_s
                   if span.time_start_s is not None and span.time_end_s is not None else 0.0)
        out.append(("item", str(item.modality), item.est_tokens, pages, seconds))
    return out


def make_plan(job: JobConfig, retry_rejects: bool = False, workers: int | None = None) -> Plan:
    started = time.monotonic()
    connector = connector_for(job)
    companions = Companions(connector, job.source.sidecar, job.source.metadata)
    fingerprint = job.fingerprint()
    previous = _previous(job)
    plan = Plan()
    todo: list[tuple[SourceObject, FileState | None]] = []
    for entry in connector.list():
        if isinstance(entry, Reject):
            plan.rejects[entry.reason] += 1
            continue
        if companions.active:
            attached = companions.attach(entry)
            if attached is None:
                continue
            entry = attached
        prev = previous.pop(entry.uri, None)
        if prev is not None and prev.unchanged(entry, fingerprint) and not (
                retry_rejects and prev.status == REJECTED):
            plan.files["unchanged"] += 1
            continue
        plan.files["changed" if prev else "new"] += 1
        todo.append((entry, prev))
    if job.run.on_delete == "delete":
        plan.files["deleted"] = len(previous)
    if todo:
        # Large files first, so the slowest work starts early and the pool ends together.
        todo.sort(key=lambda e: -e[0].size)
        with ProcessPoolExecutor(workers or os.cpu_count() or 1, initializer=_init,
                                 initargs=(job, retry_rejects)) as pool:
            for result in pool.map(_plan_one, todo, chunksize=8):
                _add(plan, result)
    plan.wall_s = time.monotonic() - started
    return plan


def _add(plan: Plan, result: list[Planned] | None) -> None:
    if result is None:
        plan.files["changed"] -= 1
        plan.files["unchanged"] += 1
        return
    for kind, name, tokens, pages, seconds in result:
        if kind == "reject":
            plan.rejects[name] += 1
            continue
        plan.items[name] += 1
        plan.tokens[name] += tokens
        plan.pages += pages
        if name == "audio":
            plan.audio_s += seconds
        elif name == "video":
            plan.video_s += seconds
