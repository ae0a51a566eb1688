"""The cluster's one quota: the :class:`Limiter` actor every embed actor asks before a call,
and the stand-ins through which an embed actor's :class:`~pipeline.stages.embedding.Embedder`
asks it (slots on calls in flight, permits of the per-minute and per-day budgets)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class Limiter:
    """The cluster's one quota: a :class:`~pipeline.gemini.limiter.RateLimiter` (when the job
    has quotas) and the AIMD limit on calls in flight, for every embed actor. Run as an async
    Ray actor; plain methods, so it can also be tested and measured on its own."""

    def __init__(self, rpm: int | None, tpm: int | None, rpd: int | None,
                 concurrency: int) -> None:
        self.quota = (rpm, tpm, rpd)
        self.concurrency = concurrency
        self.rate: Any = None
        self.slots: Any = None
        self.held: dict[int, list[object]] = {}  # per embed actor: a token per slot it holds
        self.permits: OrderedDict[int, Any] = OrderedDict()
        self.next_id = 0
        self.grants = 0

    def _ensure(self) -> None:
        """anyio's primitives are made in the actor's event loop, on first use."""
        if self.slots is None:
            from pipeline.gemini.limiter import AdaptiveConcurrency, Quota, rate_limiter

            rpm, tpm, rpd = self.quota
            self.rate = rate_limiter(Quota(rpm=rpm, tpm=tpm, rpd=rpd))
            self.slots = AdaptiveConcurrency(self.concurrency)

    async def take_slot(self, owner: int = 0) -> None:
        self._ensure()
        token = object()
        await self.slots.limiter.acquire_on_behalf_of(token)
        self.held.setdefault(owner, []).append(token)
        self.grants += 1

    async def give_slot(self, owner: int = 0) -> None:
        held = self.held.get(owner)
        if held:
            self.slots.limiter.release_on_behalf_of(held.pop())

    async def restarted(self, owner: int) -> int:
        """Embed actor ``owner`` started (again): the slots its earlier life held died with
        it. Returns how many were given back."""
        self._ensure()
        held = self.held.pop(owner, [])
        for token in held:
            self.slots.limiter.release_on_behalf_of(token)
        return len(held)

    async def permit(self, requests: int, tokens: int) -> int | str:
        """A permit's id, or why the per-day budget refuses (a value, not an exception: it
        crosses the actor boundary without Ray's wrapping)."""
        from pipeline.gemini.limiter import QuotaExceeded

        self._ensure()
        if self.rate is None:
            return 0
        try:
            permit = await self.rate.acquire(requests, tokens)
        except QuotaExceeded as exc:
            return str(exc)
        self.next_id += 1
        self.permits[self.next_id] = permit
        while len(self.permits) > 10_000:  # permits of failed calls are never settled
            self.permits.popitem(last=False)
        return self.next_id

    async def settle(self, permit_id: int, tokens: int | None) -> None:
        permit = self.permits.pop(permit_id, None)
        if permit is not None:
            permit.settle(tokens)

    async def succeeded(self) -> None:
        self._ensure()
        self.slots.on_success()

    async def throttled(self) -> None:
        self._ensure()
        self.slots.on_throttle()

    async def in_flight_limit(self) -> int:
        self._ensure()
        return int(self.slots.limit)

    async def granted(self) -> int:
        return self.grants


# --- the embed actors' view of the limiter -------------------------------------------------------


class _RemoteSlots:
    """Stands in for :class:`~pipeline.gemini.limiter.AdaptiveConcurrency` in an actor: the
    slots are the limiter actor's."""

    def __init__(self, limiter: Any, owner: int) -> None:
        self._actor = limiter
        self._owner = owner
        self.limiter = self

    async def __aenter__(self) -> None:
        await self._actor.take_slot.remote(self._owner)

    async def __aexit__(self, *exc: object) -> None:
        await self._actor.give_slot.remote(self._owner)

    def on_success(self) -> None:
        self._actor.succeeded.remote()

    def on_throttle(self) -> None:
        self._actor.throttled.remote()


class _RemotePermit:
    def __init__(self, limiter: Any, permit_id: int) -> None:
        self._actor = limiter
        self._id = permit_id

    def settle(self, tokens: int | None) -> None:
        self._actor.settle.remote(self._id, tokens)


class _RemoteRate:
    """Stands in for :class:`~pipeline.gemini.limiter.RateLimiter` in an actor."""

    def __init__(self, limiter: Any) -> None:
        self._actor = limiter

    async def acquire(self, requests: int, tokens: int) -> _RemotePermit:
        from pipeline.gemini.limiter import QuotaExceeded

        got = await self._actor.permit.remote(requests, tokens)
        if isinstance(got, str):
            raise QuotaExceeded(got)
        return _RemotePermit(self._actor, got)

