"""Counters a run keeps; read by the progress display, the summary and the run report."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunStats:
    run_id: str
    started: float = field(default_factory=time.time)
    finished: float | None = None
    files_seen: int = 0
    files_new: int = 0
    files_changed: int = 0
    files_unchanged: int = 0
    files_rejected_at_listing: int = 0  # not regular files, broken links, unlistable folders
    links_skipped: int = 0  # links to folders, not followed by design (source.follow_symlinks)
    files_sidecars: int = 0  # captions embedded with their media file, not on their own
    files_deleted: int = 0
    files_done: int = 0
    items_validated: int = 0
    items_embedded: int = 0
    items_resumed: int = 0  # committed by a killed run: counted, not paid for again
    # written with the vector of the same request (content key): from the table, a reuse_from
    # table or another item of this run; not paid for
    items_reused: int = 0
    files_moved: int = 0  # gone from the source, every part of them found under another path
    rejects: int = 0
    reject_reasons: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    api_calls: int = 0
    http_429: int = 0
    retries: int = 0
    throttled_s: float = 0.0  # waited on 429s, all calls together
    listing_done: bool = False
    # interactive or batch, and why (the job's embed.mode, the run's size, what the endpoint
    # serves)
    upgrade: str = ""  # a change of every vector's settings under way, or done by this run
    mode_used: str = "interactive"
    mode_why: str = ""
    # The Batch API (embed.mode batch or auto)
    batch_jobs: int = 0  # submitted by this run
    batch_jobs_pending: int = 0  # left running by `run --detach`
    items_batch: int = 0  # embedded through the Batch API (half price)
    items_batch_submitted: int = 0
    items_batch_awaited: int = 0  # in jobs earlier runs submitted: collected, not paid again
    items_batch_failed: int = 0  # in jobs that ended FAILED/EXPIRED/CANCELLED
    items_fallback: int = 0  # in batch mode, sent interactively (modality, size, transient)
    # results of earlier jobs not adopted: made from another request (template, task, cut)
    items_stale_results: int = 0
    items_superseded: int = 0  # in earlier jobs no item of which was wanted: paid, unused
    batch_files_released: int = 0  # closed jobs whose files on the service this run deleted
    # seconds spent making jobs' input, submitting them (upload, create), collecting results
    # (while any results download is under way: downloads at once count once)
    batch_prepare_s: float = 0.0
    batch_upload_s: float = 0.0
    batch_collect_s: float = 0.0
    # of batch_upload_s, what routing waited for (a job is uploaded while the next is filled)
    batch_upload_wait_s: float = 0.0
    tokens_batch_by_modality: Counter[str] = field(default_factory=Counter)
    tokens_by_modality: Counter[str] = field(default_factory=Counter)
    tokens_reused_by_modality: Counter[str] = field(default_factory=Counter)  # not paid
    call_latencies: list[float] = field(default_factory=list)  # successful calls, capped
    upkeep_warnings: list[str] = field(default_factory=list)  # after the commit: not failures

    MAX_LATENCY_SAMPLES = 100_000

    @property
    def wall_s(self) -> float:
        return (self.finished or time.time()) - self.started

    def record_call(self, seconds: float) -> None:
        if len(self.call_latencies) < self.MAX_LATENCY_SAMPLES:
            self.call_latencies.append(seconds)

    def latency_percentile(self, q: float) -> float | None:
        if not self.call_latencies:
            return None
        ordered = sorted(self.call_latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["call_latencies"]
        out["reject_reasons"] = dict(self.reject_reasons)
        out["tokens_by_modality"] = dict(self.tokens_by_modality)
        out["tokens_batch_by_modality"] = dict(self.tokens_batch_by_modality)
        out["tokens_reused_by_modality"] = dict(self.tokens_reused_by_modality)
        out["wall_s"] = round(self.wall_s, 3)
        out["throttled_s"] = round(self.throttled_s, 1)
        for name, q in (("latency_p50_s", 0.5), ("latency_p95_s", 0.95)):
            value = self.latency_percentile(q)
            out[name] = round(value, 4) if value is not None else None
        return out
