"""The reuse stage: content, not paths, is paid for.

Between validation and packing every item's content key (:func:`pipeline.gemini.client.
content_key`: exactly what would be sent — parts, template, title, task —, the model and the
dimensions) decides what happens to it:

- a row a killed run already committed for the same request: :class:`Committed` (counted,
  never sent again);
- a key another item of this run is already carrying to the API (its *lead*): the item waits,
  and gets the lead's vector when it comes (:meth:`Reuse.answered`) — one call for every copy;
- a key the job's table (or an ``embed.reuse_from`` table) holds: a row with the stored vector
  and no call (``reused``);
- anything else is sent, and leads its key until its row is committed (from then on the table
  has it).

Lookups go by key through the tables' ``content_key`` index, for many items at once, in a
worker thread (:meth:`Reuse.look_up`); everything else runs on the event loop only
(:meth:`Reuse.route`, :meth:`answered`, :meth:`refused`, :meth:`retire`), so the leads need
no lock. A lead whose row is committed is retired at the next :meth:`route`, never between a
look-up and its routing: an item is always either found in the table or led.

Items waiting on a lead that never answers (the run stopped; its Batch API job is left
running) leave their files incomplete: the next run does them again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import numpy as np
from anyio.abc import ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.memory import in_thread
from pipeline.records import Committed, Item, Reject, Vector
from pipeline.stages.embedding import make_vector
from pipeline.stages.writing import Outcome as WriterOutcome
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.reuse")

Outcome = Committed | Vector | Reject

# Vectors found in the tables, kept for items that ask for the same key again (the logo in
# every deck): bounded by values held, whatever the dimensions.
CACHE_VALUES = 4_000_000  # float32s: 16 MB
LOOKUP_ITEMS = 256  # items looked up in the tables at once, at most


class KeyStore(Protocol):
    """A table rows are reused from: content key -> (vector, tokens), for the keys it holds."""

    def find_keys(self, keys: Sequence[str]) -> dict[str, tuple[np.ndarray, int]]: ...


@dataclass
class _Lead:
    """An item of this run on its way to the API, and the items with its key waiting on it."""

    vector: Vector | None = None
    reject: Reject | None = None
    waiting: list[Item] = field(default_factory=list)


class Reuse:
    def __init__(self, key_of: Callable[[Item], str], stores: Sequence[KeyStore],
                 committed: Mapping[str, str | None], stats: RunStats, *,
                 enabled: bool = True) -> None:
        self.key_of = key_of
        self.stores = list(stores) if enabled else []
        self.committed = committed  # id -> content key, of rows killed runs wrote
        self.stats = stats
        self.enabled = enabled
        self.leads: dict[str, _Lead] = {}
        self._retiring: list[str] = []
        self._cache: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()
        self._cached_values = 0
        self.closed = False

    # --- in a worker thread --------------------------------------------------------------------

    def look_up(self, items: Sequence[Item]) -> tuple[list[str], dict[str, tuple[np.ndarray, int]]]:
        """The items' content keys, and the stored vectors of those neither led by an item of
        this run nor cached (blocking: it reads the tables)."""
        keys = [self.key_of(item) for item in items]
        if not self.stores:
            return keys, {}
        wanted = sorted({k for k in keys if k not in self.leads and k not in self._cache})
        found: dict[str, tuple[np.ndarray, int]] = {}
        for store in self.stores:
            if not wanted:
                break
            found.update(store.find_keys(wanted))
            wanted = [k for k in wanted if k not in found]
        return keys, found

    # --- on the event loop ---------------------------------------------------------------------

    def route(self, items: Sequence[Item], keys: Sequence[str],
              found: dict[str, tuple[np.ndarray, int]]) -> tuple[list[Item], list[Outcome]]:
        """(the items to send, the outcomes of the others: resumed and reused rows, and
        refusals of content the API refused this run)."""
        send: list[Item] = []
        done: list[Outcome] = []
        for item, key in zip(items, keys, strict=True):
            if item.id in self.committed and self.committed[item.id] in (None, key):
                done.append(Committed(item))  # None: a row of an older version
                continue
            if not self.enabled:
                send.append(item)
                continue
            lead = self.leads.get(key)
            if lead is not None:
                if lead.vector is not None:
                    done.append(self._copy(item, lead.vector))
                elif lead.reject is not None:
                    done.append(_same_refusal(item, lead.reject))
                else:
                    lead.waiting.append(item)
                continue
            stored = found.get(key) or self._cached(key)
            if stored is not None:
                self._remember(key, stored)
                done.append(self._stored(item, key, *stored))
                continue
            self.leads[key] = _Lead()
            send.append(item)
        self._retire()
        return send, done

    def answered(self, vector: Vector) -> list[Vector]:
        """The rows of the items waiting on ``vector``'s request (an embedded row)."""
        lead = self.leads.get(vector.key or "")
        if lead is None or vector.reused:
            return []
        lead.vector = vector
        waiting, lead.waiting = lead.waiting, []
        return [self._copy(item, vector) for item in waiting]

    def refused(self, reject: Reject) -> list[Reject]:
        """The API refused a lead's request: the same request of the items waiting on it is
        refused too (``api_rejected``, naming the file it was sent for; ``--retry-rejects``
        tries them again)."""
        lead = self.leads.get(reject.key or "")
        if lead is None:
            return []
        lead.reject = reject
        waiting, lead.waiting = lead.waiting, []
        return [_same_refusal(item, reject) for item in waiting]

    def retire(self, keys: Sequence[str]) -> None:
        """These keys' rows are committed: from the next routing on, the table answers them.
        Once no item will come any more (:meth:`close`), at once: a lead holds its vector,
        and a Batch API backfill commits most of its rows after its last item was routed."""
        self._retiring.extend(k for k in keys if k in self.leads)
        if self.closed:
            self._retire()

    def close(self) -> None:
        """No item comes any more: no look-up can be under way."""
        self.closed = True
        self._retire()

    def _retire(self) -> None:
        for key in self._retiring:
            lead = self.leads.get(key)
            if lead is not None and not lead.waiting:
                del self.leads[key]
        self._retiring = []

    @property
    def waiting(self) -> int:
        """Items waiting on a lead that has not answered yet."""
        return sum(len(lead.waiting) for lead in self.leads.values())

    # --- helpers -------------------------------------------------------------------------------

    def _copy(self, item: Item, vector: Vector) -> Vector:
        return make_vector(item, vector.values, vector.tokens, False, vector.key, reused=True)

    def _stored(self, item: Item, key: str, values: np.ndarray, tokens: int) -> Vector:
        return make_vector(item, values, tokens or item.est_tokens, False, key, reused=True)

    def _cached(self, key: str) -> tuple[np.ndarray, int] | None:
        stored = self._cache.get(key)
        if stored is not None:
            self._cache.move_to_end(key)
        return stored

    def _remember(self, key: str, stored: tuple[np.ndarray, int]) -> None:
        if key in self._cache:
            return
        self._cache[key] = stored
        self._cached_values += stored[0].size
        while self._cached_values > CACHE_VALUES and self._cache:
            _, (values, _) = self._cache.popitem(last=False)
            self._cached_values -= values.size


def _same_refusal(item: Item, reject: Reject) -> Reject:
    return Reject(item.source, item.version, reject.reason,
                  f"{item.source.key} part {item.part + 1}/{item.part_count}: the same content "
                  f"as {reject.source.key} was refused: {reject.message}", item.mime, item.part,
                  key=reject.key)


async def reuse_items(reuse: Reuse, items: MemoryObjectReceiveStream[list[Item]],
                      sent: ObjectSendStream[list[Item]],
                      out: ObjectSendStream[list[WriterOutcome]]) -> None:
    """The reuse stage's task: items on to packing, or straight to the writer when their
    content is paid for already. The items waiting in the stream are looked up together: one
    query per chunk of files, not per file."""
    async with items, sent, out:
        async for chunk in items:
            while len(chunk) < LOOKUP_ITEMS:
                try:
                    chunk = chunk + items.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            keys, found = await in_thread(reuse.look_up, chunk)
            onward, done = reuse.route(chunk, keys, found)
            del chunk, keys, found  # not held while the next chunk is awaited (payload budget)
            if done:
                await out.send(list(done))
            if onward:
                await sent.send(onward)
            del onward, done
    reuse.close()


def with_copies(reuse: Reuse, entry: WriterOutcome) -> list[WriterOutcome]:
    """An outcome for the writer, with the rows of the items that wait on its request."""
    if isinstance(entry, Vector):
        return [entry, *reuse.answered(entry)]
    if isinstance(entry, Reject) and entry.key is not None:
        return [entry, *reuse.refused(entry)]
    return [entry]
