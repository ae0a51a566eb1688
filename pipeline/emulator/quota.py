"""The emulator's quotas, counted the way Google counts them: every item of a batch is a
request, a refused call counts for nothing, and an exhausted quota is answered with Google's 429
body (QuotaFailure violations, Help, RetryInfo in whole seconds rounded down, the exact delay in
the message)."""

from __future__ import annotations

import math
import threading
import time

from pipeline.emulator.checks import ApiFault
from pipeline.emulator.options import EmulatorOptions, Stats
from pipeline.gemini.limiter import SlidingWindow


class Quotas:
    def __init__(self, options: EmulatorOptions, stats: Stats, lock: threading.Lock) -> None:
        self.options = options
        self.stats = stats
        self._lock = lock
        self.minute = SlidingWindow(options.window_s, options.rpm, options.tpm)
        self.day_start = time.monotonic()
        self.day_used = 0

    def charge(self, items: int, tokens: int) -> None:
        """Count a call against the quotas, or refuse it with Google's 429 body."""
        o = self.options
        now = time.monotonic()
        if now - self.day_start >= o.day_s:
            self.day_start, self.day_used = now, 0
        if o.rpd is not None and self.day_used + items > o.rpd:
            reset_in = o.day_s - (now - self.day_start)
            # Google lists the per-day violation first, then the per-minute ones beside it.
            raise self.fault("EmbedContentRequestsPerDayPerUserPerProjectPerModel", reset_in,
                                    f"requests per day ({o.rpd})",
                                    also=("EmbedContentRequestsPerMinutePerUserPerProjectPerModel",
                                          "EmbedContentInputTokensPerMinutePerUserPerProjectPerModel"))
        wait = self.minute.wait_s(now, items, tokens)
        if wait > 0:
            over_r = o.rpm is not None and self.minute.requests + items > o.rpm
            quota_id = ("EmbedContentRequestsPerMinutePerUserPerProjectPerModel" if over_r
                        else "EmbedContentInputTokensPerMinutePerUserPerProjectPerModel")
            raise self.fault(quota_id, wait,
                                    f"requests per minute ({o.rpm})" if over_r
                                    else f"input tokens per minute ({o.tpm})")
        self.minute.add(now, items, tokens)
        self.day_used += items
        with self._lock:
            self.stats.timeline.append((now, items, tokens))

    def fault(self, quota_id: str, retry_s: float, metric: str,
                     also: tuple[str, ...] = ()) -> ApiFault:
        """Google's 429: RetryInfo holds whole seconds, rounded down ("33s"), while the
        message gives the exact delay ("Please retry in 33.384105706s")."""
        with self._lock:
            self.stats.quota_429[quota_id] = self.stats.quota_429.get(quota_id, 0) + 1
        violations = [{"quotaMetric": "generativelanguage.googleapis.com/embed_content_requests",
                       "quotaId": q, "quotaDimensions": {"location": "global",
                                                         "model": "gemini-embedding"}}
                      for q in (quota_id, *also)]
        return ApiFault(429, "RESOURCE_EXHAUSTED",
                        f"You exceeded your current quota, please check your plan and billing "
                        f"details. Quota exceeded for metric: {metric}. "
                        f"Please retry in {retry_s:.9f}s.",
                        [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                          "violations": violations},
                         {"@type": "type.googleapis.com/google.rpc.Help",
                          "links": [{"description": "Learn more about Gemini API quotas",
                                     "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
                         {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                          "retryDelay": f"{math.floor(retry_s)}s"}])
