"""Packing items into batchEmbedContents calls.

A batch closes when one more item would break a bound (request count, payload bytes, tokens) or
when no item has arrived for ``linger_s`` while some wait, so a slow validator never holds
finished items back (the engine does the waiting: :attr:`BatchLimits.linger_s`). Only the open
batch is held here.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from pipeline.config import EmulatorEmbedConfig, GeminiEmbedConfig
from pipeline.models import MAX_BATCH_REQUESTS
from pipeline.records import Batch, Item


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_requests: int = MAX_BATCH_REQUESTS
    max_bytes: int = 8_000_000
    max_tokens: int = 200_000
    linger_s: float = 0.25


class Packer:
    """The packing rule: items in, full batches out (:meth:`fits`, :meth:`take`)."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self.items: list[Item] = []
        self.bytes = 0
        self.tokens = 0

    def fits(self, item: Item, size: int) -> bool:
        """``item`` (of ``size`` payload bytes) goes in the open batch."""
        if not self.items:
            return True  # an item over a bound alone still goes, alone
        lim = self.limits
        return (len(self.items) < lim.max_requests
                and self.bytes + size <= lim.max_bytes
                and self.tokens + item.est_tokens <= lim.max_tokens)

    def add(self, item: Item, size: int) -> None:
        self.items.append(item)
        self.bytes += size
        self.tokens += item.est_tokens

    @property
    def full(self) -> bool:
        return len(self.items) >= self.limits.max_requests

    def take(self) -> Batch:
        batch = Batch(tuple(self.items))
        self.items, self.bytes, self.tokens = [], 0, 0
        return batch


def limits_for(embed: EmulatorEmbedConfig | GeminiEmbedConfig) -> BatchLimits:
    """The job's bounds; a call also takes at most 1/20 of a per-minute quota, so when a
    minute's budget is nearly spent the next call still fits what is left (a minute is used to
    95 % or more)."""
    return BatchLimits(max_requests=min(embed.batch_size, _share(embed.quota.rpm)),
                       max_bytes=embed.max_batch_bytes,
                       max_tokens=min(embed.max_batch_tokens, _share(embed.quota.tpm)))


def _share(per_minute: int | None) -> int:
    return max(1, per_minute // 20) if per_minute else 10**12


async def pack(limits: BatchLimits, items: ObjectReceiveStream[list[Item]],
               batches: ObjectSendStream[Batch]) -> None:
    """The packing stage's task: items in, batches out, a batch closed when full or when no
    item came for ``linger_s`` while some wait."""
    packer = Packer(limits)
    async with items, batches:
        while True:
            chunk: list[Item] | None = None
            try:
                if packer.items:
                    with anyio.move_on_after(limits.linger_s):
                        chunk = await items.receive()
                else:
                    chunk = await items.receive()
            except anyio.EndOfStream:
                break
            if chunk is None:  # lingered long enough
                await batches.send(packer.take())
                continue
            for item in chunk:
                size = item.payload_bytes  # once: it is counted, not cached
                if not packer.fits(item, size):
                    await batches.send(packer.take())
                packer.add(item, size)
                if packer.full:
                    await batches.send(packer.take())
            del chunk, item  # the packer holds what waits; nothing else (the payload budget)
        if packer.items:
            await batches.send(packer.take())
