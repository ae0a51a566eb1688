"""The payload budget: how many bytes of large payloads (PDF parts, images, media segments) the
run holds between validation and the API, so that a corpus of large videos costs a bounded
amount of memory however fast the validator cuts them and however slow the API answers.

A large part is counted from the moment validation makes it until the last reference to it
goes (sent and answered, reused, refused, left for the next run: whichever way it leaves, the
interpreter says so, through a finalizer). Validation waits for room before each step of a file.
Small payloads are not counted: the queues' lengths bound them.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from typing import Any

import anyio

from pipeline.records import Item

# Parts under this size are not counted (a text chunk, a small image).
COUNTED_BYTES = 256 * 1024
# What a part costs while it is held: its bytes, and on its way out its base64 text, the
# request's JSON and the HTTP layer's copy (measured: RSS grew ~4.6x the raw bytes held).
FOOTPRINT = 4
# Validation goes on over the limit when no part has left for this long.
STALL_S = 5.0

log = logging.getLogger("embedpipe.budget")


class PayloadBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._counted: dict[int, weakref.finalize[..., Any]] = {}  # id(part) -> its finalizer

    def count(self, items: list[Item]) -> None:
        """Count the large parts of freshly validated items until they are gone."""
        for item in items:
            for part in item.parts:
                if part.data is not None and len(part.data) >= COUNTED_BYTES:
                    size = len(part.data) * FOOTPRINT
                    with self._lock:
                        self.held += size
                        self.peak = max(self.peak, self.held)
                        self._counted[id(part)] = weakref.finalize(
                            part, self._release, size, id(part))

    def exempt(self, items: list[Item]) -> None:
        """Stop counting these items' parts: a stage that holds them until the run's end (the
        Batch API router deciding, or awaiting an earlier job) must not stop validation."""
        for item in items:
            for part in item.parts:
                with self._lock:
                    finalizer = self._counted.pop(id(part), None)
                if finalizer is not None and (found := finalizer.detach()) is not None:
                    self._release(found[2][0], None)

    def _release(self, size: int, key: int | None) -> None:
        with self._lock:
            self.held -= size
            if key is not None:
                self._counted.pop(key, None)

    @property
    def full(self) -> bool:
        return self.held >= self.limit

    def footprint(self, items: list[Item]) -> int:
        """What these items' parts count for while they are held."""
        return sum(len(p.data) * FOOTPRINT for i in items for p in i.parts
                   if p.data is not None and len(p.data) >= COUNTED_BYTES)

    async def room(self, own: int = 0) -> None:
        """Return once the held bytes, less ``own`` (what the caller itself still holds: a
        suspended validator keeps the last item it made), are under the limit (parts leave from
        other threads); or once none has left for :data:`STALL_S` (whatever holds them waits for
        more work: a slower run, never a stuck one)."""
        if self.held - own >= self.limit:
            # parts held only by garbage in a reference cycle go with it (young cycles are
            # collected rarely in a run: memory.freeze_startup_objects)
            gc.collect(1)
        held, since = self.held, anyio.current_time()
        while self.held - own >= self.limit:
            await anyio.sleep(0.02)
            if self.held != held:
                held, since = self.held, anyio.current_time()
            elif anyio.current_time() - since > STALL_S:
                log.debug("payload budget: %d bytes held and none released for %g s: going on",
                          self.held, STALL_S)
                return
