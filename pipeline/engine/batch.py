"""What goes to the Batch API, and when: :class:`BatchRouter` sits between validation and
packing when a run may use it (``embed.mode`` batch or auto), and :func:`batch_router` builds it
for a run, with earlier runs' open jobs. Submitting, polling and collecting jobs is
:mod:`pipeline.engine.batch_driver`'s.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import anyio
import anyio.abc

from pipeline.config import JobConfig
from pipeline.engine.batch_driver import BatchDriver, open_jobs
from pipeline.engine.holding import AutoHold
from pipeline.errors import AccessError
from pipeline.gemini.batches import BatchApi
from pipeline.gemini.client import GeminiClient
from pipeline.gemini.probe import declared_batch_support, probe_batch_api
from pipeline.memory import in_thread
from pipeline.outcome import RunOutcome
from pipeline.records import BatchSupport, Collected, Item
from pipeline.stages import Stages
from pipeline.stages.batching import Batching, JobOutcome, held_item
from pipeline.stages.budget import PayloadBudget
from pipeline.stages.writing import Outcome
from pipeline.state.opened import Opened
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.batch")


class BatchRouter:
    """Between validation and packing when the job may use the Batch API: items awaited from
    an earlier run's job are held for it; in batch mode (``auto``: once more than
    ``batch_min_items`` items came, holding them until then) items go into jobs, except those
    the Batch API does not take, which go on to packing; results come back to the writer, and
    transient per-request errors go on to packing too."""

    def __init__(self, driver: BatchDriver, *, mode: str, min_items: int,
                 awaited: dict[str, tuple[str, str, str | None]], detach: bool,
                 support: BatchSupport | None = None,
                 ask: Callable[[], Awaitable[BatchSupport]] | None = None,
                 refetched: Callable[[list[Item]], Iterator[Item]] | None = None,
                 budget: PayloadBudget | None = None) -> None:
        self.driver = driver
        # items held here until the end are not counted: validation must go on meanwhile
        self._budget = budget
        self.mode = mode  # "batch" or "auto"; decided to "batch" or "interactive"
        self.min_items = min_items
        # Whether the endpoint serves the Batch API: known, or asked (once) when an auto run
        # grows past min_items.
        self.support = support
        self._ask = ask
        # items whose payload went into a job that gave no vector: read and cut again
        self._refetched = refetched
        # item id -> (display name, job name, content key) of an earlier run's job
        self.awaited = awaited
        self.detach = detach
        # (display name, job name) of an earlier run's job -> the items validated for it,
        # (about) what they hold in memory, and how many items the job holds in all
        self._adopted: dict[tuple[str, str], dict[str, Item]] = {}
        self._adopted_bytes: Counter[tuple[str, str]] = Counter()
        self._expected = Counter((display_name, name)
                                 for display_name, name, _ in awaited.values())
        self._whole: list[tuple[str, str]] = []  # all of whose items came: to hand over
        self._handed: set[tuple[str, str]] = set()  # the driver's now
        self._keys: dict[str, str] = {}  # content keys of the adopted items
        # auto mode's items, held until the run is known to be large or not
        self._held = AutoHold(budget, refetched)

    async def run(self, items: anyio.abc.ObjectReceiveStream[list[Item]],
                  pack: anyio.abc.ObjectSendStream[list[Item]],
                  out: anyio.abc.ObjectSendStream[list[Outcome]]) -> None:
        stats = self.driver.stats

        async def send(result: JobOutcome) -> None:
            for vector in result.vectors:
                stats.items_batch += 1
                stats.tokens_batch_by_modality[str(vector.item.modality)] += vector.tokens
            if result.vectors or result.rejects:
                await out.send([*result.vectors, *result.rejects])
            if result.collected is not None:
                await out.send([Collected(result.collected)])
            retry, lost = list(result.retry), list(result.lost)
            if lost and (refetched := self._refetched) is not None:
                again = await in_thread(lambda: list(refetched(lost)))
                found = {i.id for i in again}
                retry += again
                lost = [i for i in lost if i.id not in found]
            if retry:
                stats.items_fallback += len(retry)
                await pack.send(retry)
            if lost:
                self.driver.outcome.failed_items += len(lost)
                self.driver.outcome.problems.append(
                    f"{len(lost)} items failed in a Batch API job and their files could not be "
                    "read again as they were (changed or gone): the next run embeds them")

        async with items, pack, out:
            # A job is uploaded, and those finished are collected, while the next is filled.
            # On leaving, all are submitted; the collector's look under way has ended.
            async with self.driver.collector.running(functools.partial(self.driver.look, send)
                                                     ), self.driver.uploads.running():
                async for chunk in items:
                    rest = [i for i in chunk if not self._await(i)]
                    del chunk
                    await self._route(rest, pack)
                    del rest  # not held while the next chunk is awaited (the payload budget)
                    await self._hand_over_whole()
                if self.mode == "auto":  # the run stayed small: interactive it is
                    self._decide("interactive", f"embed.mode is auto and the run had no more "
                                                f"than {self.min_items:,} items "
                                                "(embed.batch_min_items)")
                    await self._held.release(self._send_decided, pack, self.driver.outcome)
                if (draft := self.driver.batching.take()) is not None:
                    await self.driver.submit(draft)
            for job in list(self._adopted):  # those some of whose items did not come
                self._hand_over(job)
            for (display_name, name), count in self._expected.items():
                if (display_name, name) not in self._handed:
                    await self.driver.supersede(display_name, name, count)
            await self.driver.collect(send, wait=not self.detach)
            stats.batch_jobs_pending = len(self.driver.open)

    def _decide(self, mode: str, why: str) -> None:
        self.mode = mode
        self.driver.stats.mode_used, self.driver.stats.mode_why = mode, why
        fallback = self.support is not None and not self.support.served
        log.log(logging.WARNING if fallback else logging.INFO, "%s API: %s", mode, why)

    def _await(self, item: Item) -> bool:
        """Whether an earlier run's job holds the result of what would be sent for ``item``
        now (its content key matches): then it is awaited, not sent again."""
        job = self.awaited.get(item.id)
        if job is None:
            return False
        display_name, name, recorded = job
        key = self.driver.batching.key(item)
        if recorded is not None and recorded != key:  # the template, task or cut changed
            self.driver.stats.items_stale_results += 1
            return False
        adopted = (display_name, name)
        if adopted in self._handed:  # met twice: its result is the driver's to write once
            return True
        if self._budget is not None:
            self._budget.exempt([item])
        found = self._adopted.setdefault(adopted, {})
        found[item.id], held = held_item(item)
        self._adopted_bytes[adopted] += held
        self._keys[item.id] = key
        if len(found) == self._expected[adopted]:
            self._whole.append(adopted)
        return True

    def _hand_over(self, job: tuple[str, str]) -> None:
        """The items validated for an earlier run's job go to the driver, which collects it."""
        found = self._adopted.pop(job)
        self.driver.adopt(*job, found, {i: self._keys.pop(i) for i in found},
                          self._adopted_bytes.pop(job, 0))
        self._handed.add(job)

    async def _hand_over_whole(self) -> None:
        """Earlier runs' jobs all of whose items have come are handed to the driver at once,
        not at the end of the run: collected as soon as they are finished (a resumed backfill
        does not hold every item it awaits until its last file is validated), their items
        counted against ``max_held_bytes``."""
        if not self._whole:
            return
        whole, self._whole = self._whole, []
        for job in whole:
            self._hand_over(job)
        await self.driver.make_room()

    async def _route(self, chunk: list[Item], pack: anyio.abc.ObjectSendStream[list[Item]]
                     ) -> None:
        if self.mode == "auto":
            self._held.add(chunk)
            if len(self._held) <= self.min_items:
                return
            if self.support is None and self._ask is not None:
                self.support = await self._ask()
            big = f"embed.mode is auto and the run has more than {self.min_items:,} items"
            if self.support is not None and not self.support.served:
                self._decide("interactive", f"{big}, but the endpoint does not serve the "
                                            f"Batch API: {self.support.why}")
            else:
                self._decide("batch", big + (f"; {self.support.why}" if self.support else ""))
            await self._held.release(self._send_decided, pack, self.driver.outcome)
            return
        await self._send_decided(chunk, pack)

    async def _send_decided(self, chunk: list[Item],
                            pack: anyio.abc.ObjectSendStream[list[Item]]) -> None:
        if not chunk:
            return
        if self.mode == "interactive":
            await pack.send(chunk)
            return
        batching, stats = self.driver.batching, self.driver.stats
        direct = []
        started = time.perf_counter()
        for item in chunk:
            if not batching.accepts(item):
                direct.append(item)
            elif (draft := batching.add(item)) is not None:
                stats.batch_prepare_s += time.perf_counter() - started
                await self.driver.submit(draft)
                await self.driver.make_room()
                started = time.perf_counter()
        stats.batch_prepare_s += time.perf_counter() - started
        if direct:
            self.driver.stats.items_fallback += len(direct)
            await pack.send(direct)


async def batch_router(job: JobConfig, client: GeminiClient, stages: Stages, state: Opened,
                       stats: RunStats, outcome: RunOutcome, *,
                       detach: bool) -> BatchRouter | None:
    """The Batch API path of a run (embed.mode batch or auto), with earlier runs' open jobs,
    where the endpoint serves it (a gateway is asked once; see :mod:`pipeline.gemini.probe`);
    None where the run stays interactive (``stats.mode_why`` says why)."""
    embed = job.embed
    if embed.mode == "interactive":
        stats.mode_why = "embed.mode is interactive"
        # Jobs an earlier run left open are still collected (what matches is adopted, not
        # paid again; the rest superseded), where the endpoint serves the Batch API.
        if not await in_thread(state.batch_log.open):
            return None
    support = declared_batch_support(embed) or await in_thread(
        state.endpoints.recall, client.base)
    if embed.mode == "interactive" and support is not None and not support.served:
        return None

    async def ask() -> BatchSupport:
        found = await probe_batch_api(client)
        if found.definite:
            await in_thread(state.endpoints.remember, client.base, found)
        return found

    if embed.mode == "batch":
        support = support or await ask()
        if not support.served:
            raise AccessError(
                f"embed.mode is batch, but the endpoint does not serve the Batch API "
                f"({support.why}); gateways serve only the interactive methods: set "
                "embed.mode to auto or interactive (or embed.batch_api: yes if it does "
                "serve it)")
        stats.mode_used, stats.mode_why = "batch", f"embed.mode is batch; {support.why}"
    elif support is not None and not support.served:
        stats.mode_why = (f"embed.mode is auto, but the endpoint does not serve the Batch "
                          f"API: {support.why}")
        log.info("interactive API: %s", stats.mode_why)
        return None
    api = BatchApi(client)
    batching = Batching(embed.batch, api.entry, stages.embedder.request_for,
                        normalise=stages.embedder.normalise,
                        prefix=f"{job.name}-{stats.run_id}", key=client.content_key)
    driver = BatchDriver(api, state.batch_log, batching, embed.batch, stats, outcome,
                         stats.run_id)
    return BatchRouter(driver, mode=embed.mode, min_items=embed.batch_min_items,
                       awaited=await open_jobs(api, state.batch_log), detach=detach,
                       support=support, ask=ask, refetched=stages.validation.refetched,
                       budget=stages.validation.budget)
