"""Client-side quotas: requests/min, tokens/min, requests/day, shared by every call in flight.

:class:`SlidingWindow` is the pure accounting (also used by the emulator to count the way the
server does); :class:`RateLimiter` makes callers wait, in arrival order, until their call fits
every budget. Waiting is ``anyio.sleep`` under an async lock, never a thread lock, so the event
loop is never blocked. Token counts are estimated before a call and corrected from the
response's ``usageMetadata`` after it.

:class:`AdaptiveConcurrency` is AIMD on the number of calls in flight: halve on a 429, grow by
one per window of successes, for quotas that are unknown or shared with other clients.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import anyio


@dataclass
class _Entry:
    at: float
    requests: int
    tokens: int


class SlidingWindow:
    """What was spent in the last ``span_s`` seconds; ``None`` budgets are unlimited."""

    def __init__(self, span_s: float, max_requests: int | None, max_tokens: int | None) -> None:
        self.span_s = span_s
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.entries: deque[_Entry] = deque()
        self.requests = 0
        self.tokens = 0

    def _expire(self, now: float) -> None:
        while self.entries and self.entries[0].at <= now - self.span_s:
            old = self.entries.popleft()
            self.requests -= old.requests
            self.tokens -= old.tokens

    def wait_s(self, now: float, requests: int, tokens: int) -> float:
        """Seconds until ``requests`` and ``tokens`` fit (0 when they fit now)."""
        self._expire(now)
        need_r = 0 if self.max_requests is None else self.requests + requests - self.max_requests
        need_t = 0 if self.max_tokens is None else self.tokens + tokens - self.max_tokens
        if need_r <= 0 and need_t <= 0:
            return 0.0
        freed_r = freed_t = 0
        for entry in self.entries:
            freed_r += entry.requests
            freed_t += entry.tokens
            if freed_r >= need_r and freed_t >= need_t:
                return entry.at + self.span_s - now
        return self.span_s  # more than the whole budget: callers must not ask for that

    def add(self, now: float, requests: int, tokens: int) -> _Entry:
        entry = _Entry(now, requests, tokens)
        self.entries.append(entry)
        self.requests += requests
        self.tokens += tokens
        return entry

    def correct(self, entry: _Entry, tokens: int) -> None:
        if entry in self.entries:
            self.tokens += tokens - entry.tokens
        entry.tokens = tokens



@dataclass(frozen=True)
class Quota:
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    margin_s: float = 0.5  # the server sees a call a little after the client counts it


class QuotaExceeded(Exception):
    """The client's own per-day budget is spent (the server was never asked)."""


class Permit:
    """One call's share of the budgets; ``settle`` replaces the token estimate by the truth."""

    def __init__(self, minute: SlidingWindow, entry: _Entry) -> None:
        self._minute = minute
        self._entry = entry

    def settle(self, tokens: int | None) -> None:
        if tokens is not None:
            self._minute.correct(self._entry, tokens)


class RateLimiter:
    def __init__(self, quota: Quota, window_s: float = 60.0) -> None:
        self.quota = quota
        self.minute = SlidingWindow(window_s + quota.margin_s, quota.rpm, quota.tpm)
        self.day_used = 0
        self._lock = anyio.Lock()

    async def acquire(self, requests: int, tokens: int) -> Permit:
        tokens = tokens if self.quota.tpm is None else min(tokens, self.quota.tpm)
        async with self._lock:
            if self.quota.rpd is not None and self.day_used + requests > self.quota.rpd:
                raise QuotaExceeded(f"the job's requests/day budget ({self.quota.rpd}) is spent")
            while (wait := self.minute.wait_s(anyio.current_time(), requests, tokens)) > 0:
                await anyio.sleep(wait)
            self.day_used += requests
            return Permit(self.minute, self.minute.add(anyio.current_time(), requests, tokens))


def rate_limiter(quota: Quota) -> RateLimiter | None:
    """The limiter a quota needs, or None when it sets no budget (calls then adapt to 429s)."""
    return RateLimiter(quota) if (quota.rpm or quota.tpm or quota.rpd) else None


class AdaptiveConcurrency:
    """AIMD over an anyio CapacityLimiter: halve on 429, +1 after ``limit`` successes."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limiter = anyio.CapacityLimiter(maximum)
        self._successes = 0

    @property
    def limit(self) -> int:
        return int(self.limiter.total_tokens)

    def on_throttle(self) -> None:
        self.limiter.total_tokens = max(1, self.limit // 2)
        self._successes = 0

    def on_success(self) -> None:
        self._successes += 1
        if self._successes >= self.limit and self.limit < self.maximum:
            self.limiter.total_tokens = self.limit + 1
            self._successes = 0
