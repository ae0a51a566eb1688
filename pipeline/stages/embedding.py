"""The embed stage: one batch of items in, vectors and rejects out.

- Requests carry what the model wants (taskType and title where the model uses them).
- Every attempt first takes a permit from the shared rate limiter (requests/min, tokens/min,
  requests/day, when the job knows its quotas) and a slot from the adaptive concurrency limit.
- Transient failures (5xx, transport) are retried with bounded attempts, waiting what the
  server's RetryInfo says, else exponential backoff with full jitter. A 429 costs no attempt
  (a per-minute quota's minute ends): it waits what the server says (RetryInfo, Retry-After,
  "Please retry in Xs"), else backs off exponentially with full jitter per *consecutive* 429
  of any caller (1 s, 2 s, 4 s ... up to ``backoff_cap_s``; a success starts again at 1 s),
  and halves the calls in flight (successes grow them back: AIMD). A call throttled for more
  than ``max_quota_wait_s`` in all stops the run cleanly (:class:`~pipeline.errors.Throttled`,
  exit 4): an endpoint that only answers 429 is not hammered.
- A terminal 4xx on a batch is bisected, so only the items the API refuses become
  ``api_rejected`` rejects and the rest are embedded.
- Vectors are L2-normalised where the model does not do it (gemini-embedding-001 below 3072).
- A per-day quota error is not retried: it propagates so the run can stop cleanly; so does an
  :class:`~pipeline.errors.AccessError` (the key, the model): no item is blamed for it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import replace

import anyio
import numpy as np
import numpy.typing as npt

from pipeline.errors import (
    QuotaExhausted,
    RejectReason,
    TerminalEmbedError,
    Throttled,
    TransientEmbedError,
)
from pipeline.gemini.client import EmbedRequest, EmbedResponse, GeminiClient
from pipeline.gemini.limiter import AdaptiveConcurrency, Permit, QuotaExceeded, RateLimiter
from pipeline.gemini.tasks import TaskStyle
from pipeline.models import ModelSpec
from pipeline.records import Batch, Item, Reject, Vector
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.embed")


class Embedder:
    def __init__(self, client: GeminiClient, spec: ModelSpec, *, style: TaskStyle,
                 max_attempts: int, stats: RunStats, limiter: RateLimiter | None = None,
                 concurrency: AdaptiveConcurrency | None = None, backoff_base_s: float = 1.0,
                 backoff_cap_s: float = 60.0, max_quota_wait_s: float = 600.0) -> None:
        self.client = client
        self.limiter = limiter
        self.concurrency = concurrency or AdaptiveConcurrency(64)
        self.spec = spec
        self.style = style
        self.max_attempts = max_attempts
        self.stats = stats
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_quota_wait_s = max_quota_wait_s
        self.normalise = not spec.is_normalised(client.dims)
        self._throttles = 0  # consecutive 429s of every caller: a success resets it

    def request_for(self, item: Item) -> EmbedRequest:
        return self.style.document(item)

    def key_for(self, item: Item) -> str:
        """The content key of what would be sent for ``item`` (GeminiClient.content_key)."""
        return self.client.content_key(self.request_for(item))

    async def embed_batch(self, batch: Batch) -> tuple[list[Vector], list[Reject]]:
        return await self._embed(list(batch.items))

    async def _embed(self, items: list[Item]) -> tuple[list[Vector], list[Reject]]:
        requests = [self.request_for(i) for i in items]  # once: sent, then keyed
        try:
            response = await self._call_with_retries(items, requests)
            vectors = self._vectors(items, requests, response)
        except TerminalEmbedError as exc:
            if len(items) == 1:
                item = items[0]
                return [], [Reject(item.source, item.version, RejectReason.API_REJECTED,
                                   f"{item.source.key} part {item.part + 1}/{item.part_count}: "
                                   f"the API refused it: {exc}", item.mime, item.part,
                                   key=self.client.content_key(requests[0]))]
            mid = len(items) // 2
            left = await self._embed(items[:mid])
            right = await self._embed(items[mid:])
            return left[0] + right[0], left[1] + right[1]
        return vectors, []

    async def _call_with_retries(self, items: Sequence[Item],
                                 requests: Sequence[EmbedRequest]) -> EmbedResponse:
        tokens = sum(i.est_tokens for i in items)
        attempt = 0
        throttled_s = 0.0  # waited on 429s: they cost no attempt, only time
        while True:
            attempt += 1
            try:
                async with self.concurrency.limiter:
                    permit = await self._permit(len(items), tokens)
                    self.stats.api_calls += 1
                    started = time.monotonic()
                    if len(requests) == 1:
                        response = await self.client.embed(requests[0])
                    else:
                        response = await self.client.batch_embed(requests)
                    self.stats.record_call(time.monotonic() - started)
                    if permit is not None:
                        permit.settle(response.prompt_tokens)
                self.concurrency.on_success()
                self._throttles = 0
                return response
            except QuotaExhausted:
                self.stats.http_429 += 1
                raise
            except TransientEmbedError as exc:
                if exc.http_status == 429:
                    # A quota means wait, not fail: bounded by time, not by attempts.
                    attempt -= 1
                    self.stats.http_429 += 1
                    self.concurrency.on_throttle()
                    self._throttles += 1
                    delay = self._delay(self._throttles, exc.retry_after_s)
                    left = self.max_quota_wait_s - throttled_s
                    if exc.retry_after_s is None:  # the last try comes at the limit itself
                        delay = min(delay, left)
                    if left <= 0 or delay > left:
                        raise Throttled(
                            f"answered 429 for {throttled_s:.0f} s of waiting (embed."
                            f"max_quota_wait_s is {self.max_quota_wait_s:g}); last: {exc}",
                            http_status=429, status=exc.status) from None
                    throttled_s += delay
                    self.stats.throttled_s += delay
                    log.warning("throttled (%s): %.0f s waited so far on this batch, next try "
                                "in %.1f s%s", exc, throttled_s, delay,
                                "" if exc.retry_after_s is not None else
                                " (no retry information: backing off)")
                else:
                    if attempt >= self.max_attempts:
                        raise
                    delay = self._delay(attempt, exc.retry_after_s)
                    log.warning("transient error (%s); retry %d/%d in %.1fs", exc, attempt,
                                self.max_attempts - 1, delay)
                self.stats.retries += 1
                await anyio.sleep(delay)

    async def _permit(self, requests: int, tokens: int) -> Permit | None:
        if self.limiter is None:
            return None
        try:
            return await self.limiter.acquire(requests, tokens)
        except QuotaExceeded as exc:
            raise QuotaExhausted(str(exc), status="CLIENT_BUDGET") from exc

    def _delay(self, attempt: int, server_says: float | None) -> float:
        if server_says is not None:
            return server_says + random.uniform(0, 0.1 * max(server_says, 1.0))
        return random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1)))

    def _vectors(self, items: Sequence[Item], requests: Sequence[EmbedRequest],
                 response: EmbedResponse) -> list[Vector]:
        estimated = sum(i.est_tokens for i in items) or 1
        reported = response.prompt_tokens
        return [make_vector(item, values, item.est_tokens if reported is None
                            else round(item.est_tokens * reported / estimated), self.normalise,
                            self.client.content_key(request))
                for item, request, values in zip(items, requests, response.vectors, strict=True)]


def make_vector(item: Item, values: npt.NDArray[np.float32], tokens: int,
                normalise: bool, key: str | None = None, *, reused: bool = False) -> Vector:
    """An item's row: its vector L2-normalised where the model does not do it, and without the
    payload bytes (they are sent: not held to the write). Raises TerminalEmbedError for a zero
    vector, which cannot be normalised."""
    if normalise:
        norm = float(np.linalg.norm(values))
        if norm == 0.0:
            raise TerminalEmbedError("the API returned a zero vector", status="BAD_RESPONSE")
        values = (values / norm).astype(np.float32)
    if any(p.data is not None for p in item.parts):
        item = replace(item, parts=())
    return Vector(item, values, tokens, key, reused)
