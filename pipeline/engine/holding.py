"""What ``embed.mode: auto`` holds while it cannot yet tell whether a run is large (more than
``batch_min_items`` items: the Batch API) or not (interactive calls).

The held items keep their payloads until those fill the payload budget; from then on the
payloads are let go (the items keep everything else) and cut again from their files when the
mode is decided, one item at a time within the budget, so that validation goes on meanwhile and
a media run holds no more than the budget whatever ``batch_min_items`` is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace

import anyio
import anyio.abc

from pipeline.memory import in_thread
from pipeline.outcome import RunOutcome
from pipeline.records import Item
from pipeline.stages.budget import PayloadBudget

Send = Callable[[list[Item], anyio.abc.ObjectSendStream[list[Item]]], Awaitable[None]]


class AutoHold:
    def __init__(self, budget: PayloadBudget | None,
                 refetched: Callable[[list[Item]], Iterator[Item]] | None) -> None:
        self.budget = budget
        self.refetched = refetched
        self.items: list[Item] = []
        self.stripped: set[str] = set()  # ids of held items whose payload was let go

    def __len__(self) -> int:
        return len(self.items)

    def add(self, chunk: list[Item]) -> None:
        self.items += chunk
        if self.budget is None:
            return
        if self.refetched is None:  # nothing can cut them again: held whole, uncounted
            self.budget.exempt(chunk)
            return
        if not self.budget.full:
            return
        for index, item in enumerate(self.items):
            if any(p.data is not None for p in item.parts):
                self.items[index] = replace(item, parts=())
                self.stripped.add(item.id)

    async def release(self, send: Send, pack: anyio.abc.ObjectSendStream[list[Item]],
                      outcome: RunOutcome) -> None:
        """The mode is decided: every held item to ``send``, those whose payload was let go
        cut again first, one at a time within the budget."""
        held, self.items = self.items, []
        await send([i for i in held if i.id not in self.stripped], pack)
        stripped = [i for i in held if i.id in self.stripped]
        del held
        self.stripped.clear()
        if not stripped:
            return
        assert self.refetched is not None and self.budget is not None
        cut = self.refetched(stripped)
        found = own = 0
        while True:
            await self.budget.room(own)  # the generator holds the last item it made
            item = await in_thread(next, cut, None)
            if item is None:
                break
            self.budget.count([item])
            own = self.budget.footprint([item])
            found += 1
            await send([item], pack)
            del item
        if lost := len(stripped) - found:
            outcome.failed_items += lost
            outcome.problems.append(
                f"{lost} items could not be cut again from their files (changed or gone since "
                "they were validated): the next run embeds them")
