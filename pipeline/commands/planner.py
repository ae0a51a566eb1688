"""``embedpipe plan``: what a run would do and cost, without calling the embedding API.

It lists the source, diffs it against the manifest (read only: nothing is created or written),
and runs the validator in plan mode over what is new or changed: the same items, spans and token
estimates as a run, but no PDF part written and no media cut or converted. Unchanged files are
not read. Objects in a store are read by range, as the parsers ask: a video's header and index,
a PDF's trailer, cross-reference and page tree, an image's header (``bytes_read`` in the plan
says what that cost), so a truncated media file is found by the run, not the plan; local files
are read as a run reads them. Costs come from the job's price table; the wall time is the
quota's bound when the job states its quotas.

Validation runs in worker processes (parsing is CPU work), which nothing can hang: each file
has a deadline enforced inside the worker by a timer signal, and a worker stuck where signals
do not reach (inside a C library) is given up on with its whole pool, which is replaced. Workers
ignore Ctrl-C; the parent ends them all on its way out.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.pool
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from connectors import connector_for
from connectors.base import content_version
from connectors.blob import Blob
from pipeline.commands.plan_tables import (
    manifest_rows,
    move_stored,
    moved_count,
    state_db,
    submitted_ids,
    upgrade_note,
)
from pipeline.config import JobConfig
from pipeline.errors import ConnectorError, SourceUnavailable
from pipeline.gemini.client import content_key
from pipeline.models import FACTS_AS_OF, SOURCES, cost_usd
from pipeline.records import Extras, Reject, SourceObject
from pipeline.stages.companions import Companions
from pipeline.stages.listing import Listing, Todo
from pipeline.state.manifest import mass_delete_refusal
from pipeline.stats import RunStats
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
    delete_refusal: str | None = None  # why the run would refuse its deletions
    upgrade: str | None = None  # a change of every vector's settings, and how it is made
    submitted: frozenset[str] = frozenset()  # ids in earlier runs' open Batch API jobs
    awaited: int = 0  # items those jobs hold: collected by a run, not paid again
    # items whose request the job's table (or reuse_from) holds, or another item of the run
    # sends: written with a stored vector, no call. Known where plan mode has the payload
    # (texts, images in a format sent as they are), not for PDF parts and cut media.
    reused: Counter[str] = field(default_factory=Counter)
    reused_tokens: Counter[str] = field(default_factory=Counter)
    keyed: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> modality, tokens
    reuse: bool = True  # the job's embed.reuse
    dup_keys: set[str] = field(default_factory=set)
    bytes_read: int = 0  # taken from the source to plan the files read
    bytes_of_files_read: int = 0
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
            "files": dict(self.files), "items": dict(+self.items),
            "tokens": dict(+self.tokens), "tokens_total": tokens,
            "pdf_pages": self.pages, "audio_seconds": round(self.audio_s, 1),
            "video_seconds": round(self.video_s, 1), "rejects": dict(self.rejects),
            "cost_usd": round(cost_usd(dict(self.tokens), prices), 6),
            "cost_usd_batch_api": round(cost_usd(dict(self.tokens), prices) / 2, 6),
            "mode": _mode(job, requests),
            "prices_usd_per_million_tokens": prices,
            # where the prices come from: the job's embed.prices, or the list prices recorded
            # in pipeline/models.py (when, and the page to check them on)
            "prices_source": ("embed.prices" if job.embed.prices is not None else
                              f"list prices as of {FACTS_AS_OF} ({SOURCES['prices']})"),
            "quota_bound_minutes": round(max(minutes), 2) if any(minutes) else None,
            "days_by_requests_per_day": (math.ceil(requests / quota.rpd) if quota.rpd
                                         else None),
            "delete_refusal": self.delete_refusal,
            "upgrade": self.upgrade,
            "items_awaited": self.awaited,
            "items_reused": sum(self.reused.values()),
            "cost_saved_usd": round(cost_usd(dict(self.reused_tokens), prices), 6),
            "bytes_read": self.bytes_read,
            "bytes_of_files_read": self.bytes_of_files_read,
            "plan_wall_s": round(self.wall_s, 2),
        }


# One validator per worker process (parsing PDFs and measuring media is CPU work: processes
# use every core where threads would share one).
_worker: dict[str, Any] = {}


class _FileTimeout(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _FileTimeout


def _init(job: JobConfig, retry_rejects: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGALRM, _alarm)
    connector = connector_for(job)
    _worker.update(job=job, connector=connector, validator=Validator(job), model=job.embed.model,
                   dims=job.embed.output_dimensionality,
                   companions=Companions(connector, job.source.sidecar, job.source.metadata),
                   fingerprint=job.fingerprint(), retry_rejects=retry_rejects,
                   limit_s=_file_limit_s(job))


def _file_limit_s(job: JobConfig) -> float:
    """A file's time in a worker; the validator checks ``file_timeout_s`` itself first."""
    return job.validate_.file_timeout_s * 1.5 + 1.0


# (kind, modality or reason, tokens, pages, seconds, item id, content key or "")
Planned = tuple[str, str, int, int, float, str, str]
# a file's planned items (None: only touched), the bytes read to plan it, and its size
FilePlan = tuple[list[Planned] | None, int, int]
_TIMEOUT: list[Planned] = [("reject", "timeout", 0, 0, 0.0, "", "")]
_UNREADABLE: list[Planned] = [("reject", "unreadable", 0, 0, 0.0, "", "")]


def _plan_group(group: list[Todo]) -> list[FilePlan]:
    """Each file of a group planned under its own deadline (a timer signal: it interrupts
    Python code and blocking system calls alike)."""
    out: list[FilePlan] = []
    for entry in group:
        signal.setitimer(signal.ITIMER_REAL, _worker["limit_s"])
        try:
            out.append(_plan_one(entry))
        except _FileTimeout:
            out.append((_TIMEOUT, 0, entry.obj.size))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return out


def _plan_one(entry: Todo) -> FilePlan:
    """A file's planned items as small tuples (None when it is only touched), read by range
    where the connector reads a store."""
    w = _worker
    obj, prev = entry.obj, entry.prev
    try:
        data = w["connector"].ranged(obj)
    except SourceUnavailable:
        raise  # the store failed, not the file: the plan cannot be made (the pool hands it up)
    except ConnectorError:
        return _UNREADABLE, 0, obj.size
    with data:
        try:
            version = obj.version or content_version(data)
            extras = None
            if w["companions"].active:
                version, extras = w["companions"].read(obj, version)
            if (prev is not None and not w["retry_rejects"]
                    and prev.same_content(version, w["fingerprint"])):
                return None, data.fetched, obj.size
            planned = _planned(obj.with_version(version), data, extras)
        except SourceUnavailable:
            raise
        except ConnectorError:
            return _UNREADABLE, data.fetched, obj.size
        # a read that failed inside a parser (which may call it corrupt) is the store's fault
        if isinstance(data.read_error, SourceUnavailable):
            raise data.read_error
        return (_UNREADABLE if data.read_error else planned), data.fetched, obj.size


def _planned(obj: SourceObject, data: Blob, extras: Extras | None) -> list[Planned]:
    w = _worker
    out: list[Planned] = []
    for item in w["validator"].plan(obj, data, extras):
        if isinstance(item, Reject):
            out.append(("reject", item.reason, 0, 0, 0.0, "", ""))
            continue
        span = item.span
        pages = (span.page_end - span.page_start + 1
                 if span.page_start is not None and span.page_end is not None else 0)
        seconds = (span.time_end_s - span.time_start_s
                   if span.time_start_s is not None and span.time_end_s is not None else 0.0)
        # plan mode leaves PDF parts and cut media empty: their requests are not known
        known = all(p.text is not None or p.data for p in item.parts)
        key = (content_key(w["validator"].style.document(item), w["model"], w["dims"])
               if known else "")
        out.append(("item", str(item.modality), item.est_tokens, pages, seconds, item.id, key))
    return out


def make_plan(job: JobConfig, retry_rejects: bool = False, workers: int | None = None,
              allow_mass_delete: bool = False) -> Plan:
    started = time.monotonic()
    connector = connector_for(job)
    companions = Companions(connector, job.source.sidecar, job.source.metadata)
    fingerprint = job.fingerprint()
    plan = Plan(reuse=job.embed.reuse)
    seen = RunStats(run_id="plan")
    with manifest_rows(job) as (rows, known):
        listing = Listing(connector, companions, rows, known, fingerprint, seen,
                          retry_rejects=retry_rejects)
        todo: list[Todo] = []
        while (chunk := listing.next_chunk()) is not None:
            found, rejects = listing.diff(chunk)
            todo += found
            plan.rejects.update(r.reason for r in rejects)
    for name, count in (("new", seen.files_new), ("changed", seen.files_changed),
                        ("unchanged", seen.files_unchanged)):
        if count:
            plan.files[name] = count
    state = state_db(job)
    if state is not None:
        plan.upgrade = upgrade_note(state, job, seen.files_changed)
        plan.submitted = submitted_ids(state, job)
    gone = listing.gone() if job.run.on_delete == "delete" else []
    if todo:
        # Large files first, so the slowest work starts early and the pool ends together.
        todo.sort(key=lambda e: -e.obj.size)
        for result in _validate_all(job, retry_rejects, todo, workers or os.cpu_count() or 1):
            _add(plan, result)
    planned = set(plan.keyed)
    if plan.reuse and plan.keyed:
        move_stored(plan, job, state)
    if job.run.on_delete == "delete":
        plan.files["deleted"] = len(gone)
        moved = moved_count(state, job, gone, planned | plan.dup_keys)
        if moved:
            plan.files["moved"] = moved
        plan.delete_refusal = mass_delete_refusal(
            len(gone) - moved, listing.known, seen.files_seen, job.run.max_delete_fraction,
            allow_mass_delete)
    plan.wall_s = time.monotonic() - started
    return plan


SMALL_FILE_BYTES = 1_000_000
GROUP_FILES = 32


def _groups(todo: list[Todo]) -> list[list[Todo]]:
    """Large files alone (the slow, risky parsers), small ones in groups (fewer hops)."""
    large = [[e] for e in todo if e.obj.size > SMALL_FILE_BYTES]
    small = [e for e in todo if e.obj.size <= SMALL_FILE_BYTES]
    return large + [small[i:i + GROUP_FILES] for i in range(0, len(small), GROUP_FILES)]


def _validate_all(job: JobConfig, retry_rejects: bool, todo: list[Todo],
                  workers: int) -> Iterator[FilePlan]:
    """Every file's planned items, in worker processes, with at most ``2 x workers`` groups
    in flight. The oldest group in flight has had every chance to start: if it is not done
    within its files' deadlines (plus slack), its worker is stuck where the timer cannot reach
    it; its files become timeouts and the pool is replaced (a pool cannot end one worker)."""
    # spawn: forking a process whose Lance and tokio threads are running is not safe
    context = multiprocessing.get_context("spawn")
    queue = deque(_groups(todo))
    limit_s = _file_limit_s(job)
    while queue:
        with context.Pool(workers, initializer=_init, initargs=(job, retry_rejects)) as pool:
            flight: deque[tuple[list[Todo], multiprocessing.pool.AsyncResult[Any]]] = deque()
            while queue or flight:
                while queue and len(flight) < 2 * workers:
                    group = queue.popleft()
                    flight.append((group, pool.apply_async(_plan_group, (group,))))
                group, pending = flight[0]
                try:
                    results = pending.get(timeout=limit_s * len(group) + 10.0)
                except multiprocessing.TimeoutError:
                    yield from ((_TIMEOUT, 0, e.obj.size) for e in group)
                    flight.popleft()
                    queue.extendleft(reversed([g for g, _ in flight]))
                    break  # leaving the with-block terminates the pool, stuck worker included
                flight.popleft()
                yield from results


def _add(plan: Plan, planned: FilePlan) -> None:
    result, read, size = planned
    plan.bytes_read += read
    plan.bytes_of_files_read += size
    if result is None:
        plan.files["changed"] -= 1
        plan.files["unchanged"] += 1
        return
    for kind, name, tokens, pages, seconds, item_id, key in result:
        if kind == "reject":
            plan.rejects[name] += 1
            continue
        if item_id in plan.submitted:  # an earlier run's Batch API job holds it: paid
            plan.awaited += 1
            continue
        if key and plan.reuse and key in plan.keyed:  # another item of the run sends the same request
            plan.dup_keys.add(key)
            plan.reused[name] += 1
            plan.reused_tokens[name] += tokens
            continue
        if key:
            plan.keyed[key] = (name, tokens)
        plan.items[name] += 1
        plan.tokens[name] += tokens
        plan.pages += pages
        if name == "audio":
            plan.audio_s += seconds
        elif name == "video":
            plan.video_s += seconds


def _mode(job: JobConfig, items: int) -> str:
    """What a run would use: ``embed.mode``, with ``auto`` decided by the item count."""
    mode = job.embed.mode
    if mode == "auto":
        return "batch" if items > job.embed.batch_min_items else "interactive"
    return mode
