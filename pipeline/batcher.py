"""Packing items into batchEmbedContents calls.

A batch closes when one more item would break a bound (request count, payload bytes, tokens) or
when no item has arrived for ``linger_s`` while some wait, so a slow validator never holds
finished items back. Only the open batch is held here; the bounded streams on either side keep
the whole window of items in memory bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from pipeline.models import MAX_BATCH_REQUESTS
from pipeline.records import Batch, Item


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_requests: int = MAX_BATCH_REQUESTS
    max_bytes: int = 8_000_000
    max_tokens: int = 200_000
    linger_s: float = 0.25


class Packer:
    """The pure packing rule, separate from the streams so it can be tested on its own."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self.items: list[Item] = []
        self.bytes = 0
        self.tokens = 0

    def fits(self, item: Item) -> bool:
        if not self.items:
            return True  # an item over a bound alone still goes, alone
        lim = self.limits
        return (len(self.items) < lim.max_requests
                and self.bytes + item.payload_bytes <= lim.max_bytes
                and self.tokens + item.est_tokens <= lim.max_tokens)

    def add(self, item: Item) -> None:
        self.items.append(item)
        self.bytes += item.payload_bytes
        self.tokens += item.est_tokens

    @property
    def full(self) -> bool:
        return len(self.items) >= self.limits.max_requests

    def take(self) -> Batch:
        batch = Batch(tuple(self.items))
        self.items, self.bytes, self.tokens = [], 0, 0
        return batch


async def pack(items: ObjectReceiveStream[list[Item]], batches: ObjectSendStream[Batch],
               limits: BatchLimits) -> None:
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
                if not packer.fits(item):
                    await batches.send(packer.take())
                packer.add(item)
                if packer.full:
                    await batches.send(packer.take())
        if packer.items:
            await batches.send(packer.take())
