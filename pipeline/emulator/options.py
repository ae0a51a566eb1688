"""How the emulator behaves (:class:`EmulatorOptions`) and what it counts (:class:`Stats`)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

AuthStyle = Literal["google", "bearer", "raw", "any"]


@dataclass(frozen=True)
class EmulatorOptions:
    """How the emulator behaves. Quotas count the way Google does: every item of a batch is a
    request; a refused call counts for nothing. Fault rates are per HTTP call, 0..1."""

    api_key: str | None = None
    auth: AuthStyle = "any"
    # Keys answered as Google answers a key reported as leaked (403 PERMISSION_DENIED).
    revoked_keys: tuple[str, ...] = ()
    latency_ms: float = 0.0
    per_item_ms: float = 0.0
    jitter_ms: float = 0.0
    keep_requests: int = 200
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    window_s: float = 60.0  # the "minute" of rpm/tpm (shorter in tests)
    day_s: float = 86_400.0
    error_429: float = 0.0  # a per-minute 429 as if others shared the quota
    error_500: float = 0.0
    error_503: float = 0.0
    reset: float = 0.0
    stall: float = 0.0
    stall_s: float = 30.0
    truncate: float = 0.0
    seed: int | None = None
    # The Batch API and the Files API (pipeline.emulator.batches, .files).
    batch_delay_s: float = 1.0  # from submission to results (half PENDING, half RUNNING)
    batch_outcome: Literal["succeed", "fail", "expire"] = "succeed"
    batch_error_rate: float = 0.0  # requests answered with a transient per-request error
    max_batch_inline_bytes: int = 20_000_000
    max_file_bytes: int = 2_000_000_000
    # Files API: how fast an upload's bytes come in (none: as fast as the machine takes them)
    upload_mb_per_s: float | None = None
    # ... and how fast a download's bytes go out (none: as fast as the machine sends them)
    download_mb_per_s: float | None = None


@dataclass
class Stats:
    http_requests: int = 0
    embed_calls: int = 0
    batch_calls: int = 0
    items: int = 0
    tokens: int = 0
    tokens_by_modality: dict[str, int] = field(default_factory=dict)
    by_status: dict[str, int] = field(default_factory=dict)
    auth_seen: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    quota_429: dict[str, int] = field(default_factory=dict)
    batch_jobs: int = 0
    batch_items: int = 0  # embedded by the Batch API (not counted in items/tokens)
    batch_tokens: int = 0
    # (monotonic time, items, tokens) of each call served, for benchmarks; bounded.
    timeline: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=100_000))

    def as_dict(self) -> dict[str, Any]:
        return {
            "http_requests": self.http_requests, "embed_calls": self.embed_calls,
            "batch_calls": self.batch_calls, "items": self.items, "tokens": self.tokens,
            "tokens_by_modality": dict(self.tokens_by_modality),
            "by_status": dict(self.by_status), "http_429": self.by_status.get("429", 0),
            "auth_seen": dict(self.auth_seen), "faults": dict(self.faults),
            "quota_429": dict(self.quota_429), "batch_jobs": self.batch_jobs,
            "batch_items": self.batch_items, "batch_tokens": self.batch_tokens,
        }
