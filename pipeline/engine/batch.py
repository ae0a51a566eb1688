"""How the local engine drives Batch API jobs: submit (recorded before anything is paid),
poll with backoff, collect. The rules (what goes in a job, what a result becomes) are the
batching stage's (:mod:`pipeline.stages.batching`); the exactly-once log is
:mod:`pipeline.state.batches`.

- :meth:`BatchDriver.submit` records the job (``submitting``, with its item ids) before creating
  it, uploads a JSONL file (or sends it inline when small), then records its name (``pending``).
- :meth:`BatchDriver.adopt` takes over a job an earlier run submitted, with the items this run
  validated again for it: they are awaited, never submitted (paid) twice.
- :meth:`BatchDriver.collect` polls every open job, backing off from ``poll_initial_s`` to
  ``poll_max_s`` and riding out transient errors and 429s, and hands each finished job's rows
  to the writer. A job that ends FAILED, EXPIRED or CANCELLED leaves its items to the next run.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import anyio
import anyio.abc

from pipeline.config import BatchSettings, JobConfig
from pipeline.engine.holding import AutoHold
from pipeline.errors import AccessError, EmbedError, TransientEmbedError
from pipeline.gemini.batches import BatchApi, BatchJob, BatchResult
from pipeline.gemini.client import GeminiClient
from pipeline.gemini.probe import declared_batch_support, probe_batch_api
from pipeline.memory import in_thread
from pipeline.outcome import RunOutcome
from pipeline.records import BatchSupport, Collected, Item
from pipeline.stages import Stages
from pipeline.stages.batching import Batching, JobDraft, JobOutcome
from pipeline.stages.budget import PayloadBudget
from pipeline.stages.writing import Outcome
from pipeline.state.batches import FAILED, PENDING, SUPERSEDED, BatchLog
from pipeline.state.opened import Opened
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.batch")
RESULTS_CHUNK = 1000


@dataclass
class _Open:
    display_name: str
    name: str
    items: dict[str, Item]  # by id: what this run writes when the results come
    keys: dict[str, str]  # by id: the content key of each item's request


class BatchDriver:
    def __init__(self, api: BatchApi, batch_log: BatchLog, batching: Batching,
                 settings: BatchSettings, stats: RunStats, outcome: RunOutcome,
                 run_id: str) -> None:
        self.api = api
        self.log = batch_log
        self.batching = batching
        self.settings = settings
        self.stats = stats
        self.outcome = outcome
        self.run_id = run_id
        self.open: list[_Open] = []

    async def submit(self, draft: JobDraft) -> None:
        await in_thread(self.log.submitting, draft.display_name, self.run_id,
                        list(draft.items), [draft.keys[i] for i in draft.items])
        file_name = None
        if draft.bytes <= self.settings.max_inline_bytes:
            job = await self.api.create(display_name=draft.display_name, inline=draft.entries)
        else:
            data = await in_thread(self.api.jsonl, draft.entries)
            draft.entries.clear()  # the payloads are in the file now
            file_name = await self.api.upload(data, display_name=draft.display_name)
            del data
            job = await self.api.create(display_name=draft.display_name, file_name=file_name)
        await in_thread(lambda: self.log.set(
            draft.display_name, status=PENDING, name=job.name, input_file=file_name))
        self.stats.batch_jobs += 1
        self.stats.items_batch_submitted += len(draft.items)
        self.open.append(_Open(draft.display_name, job.name, draft.items, draft.keys))
        log.info("submitted %s (%s): %d items", job.name, draft.display_name, len(draft.items))

    def adopt(self, display_name: str, name: str, items: dict[str, Item],
              keys: dict[str, str]) -> None:
        self.stats.items_batch_awaited += len(items)
        self.open.append(_Open(display_name, name, items, keys))

    async def supersede(self, display_name: str, name: str, items: int) -> None:
        """A job none of whose results this run wants (its files changed or went, or the
        settings did): cancelled if it still runs, recorded ``superseded`` either way, so it
        is neither awaited for ever nor shown as running."""
        try:
            info = await self.api.get(name)
            if not info.done:
                await self.api.cancel(name)
        except EmbedError as exc:
            if exc.http_status != 404:
                log.warning("superseded job %s: %s", name, exc)
                return  # tried again by the next run
        await in_thread(lambda: self.log.set(display_name, status=SUPERSEDED))
        self.stats.items_superseded += items
        log.info("batch %s (%s): no item of it is wanted any more: superseded", name,
                 display_name)

    async def collect(self, send: Callable[[JobOutcome], Awaitable[None]], *,
                      wait: bool = True) -> None:
        """Until every open job is finished and written (``wait=False``: one look, writing
        the jobs already finished and leaving the others running)."""
        delay = self.settings.poll_initial_s
        while self.open:
            for job in list(self.open):
                try:
                    info = await self.api.get(job.name)
                except TransientEmbedError as exc:
                    log.warning("polling %s: %s; trying again", job.name, exc)
                    continue
                except EmbedError as exc:
                    if exc.http_status != 404:
                        raise
                    # deleted, or a server that did not keep it (an emulator restarted)
                    info = BatchJob(job.name, "BATCH_STATE_NOT_FOUND")
                if info.done or info.state == "BATCH_STATE_NOT_FOUND":
                    await self._finish(job, info, send)
                    self.open.remove(job)
            if not wait:
                return
            if self.open:
                await anyio.sleep(delay)
                delay = min(delay * 1.5, self.settings.poll_max_s)

    async def _finish(self, job: _Open, info: BatchJob,
                      send: Callable[[JobOutcome], Awaitable[None]]) -> None:
        if info.state != "BATCH_STATE_SUCCEEDED":
            self.stats.items_batch_failed += len(job.items)
            n = len(job.items)
            if self.settings.fallback == "interactive":
                # what still holds its payload (texts) is embedded now; media, whose bytes
                # went into the job, wait for the next run, which reads them again
                out = self.batching.missing(job.items)
                self.outcome.problems.append(
                    f"batch {info.name} ({job.display_name}) ended {info.state}: "
                    f"{len(out.retry):,} of its {n:,} items embedded interactively now"
                    + (f", {len(out.lost):,} submitted again by the next run" if out.lost
                       else ""))
                await send(out)
            else:
                self.outcome.failed_items += n
                self.outcome.problems.append(
                    f"batch {info.name} ({job.display_name}) ended {info.state}: its "
                    f"{n:,} items are submitted again by the next run")
            await in_thread(lambda: self.log.set(job.display_name, status=FAILED))
            return
        chunk: list[tuple[str, BatchResult]] = []
        try:
            async for result in self.api.results(info):
                chunk.append(result)
                if len(chunk) >= RESULTS_CHUNK:
                    await send(self.batching.outcomes(job.items, job.keys, chunk))
                    chunk = []
        except EmbedError as exc:
            # Not written: the job stays pending and the next run collects it again.
            self.outcome.problems.append(f"could not read the results of {info.name}: {exc}")
            self.outcome.failed_items += len(job.items)
            return
        await send(self.batching.outcomes(job.items, job.keys, chunk))
        await send(self.batching.missing(job.items))
        # collected once the writer has committed every row sent before this
        await send(JobOutcome(collected=job.display_name))


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
        # (display name, job name) of an earlier run's job -> the items validated for it
        self._adopted: dict[tuple[str, str], dict[str, Item]] = {}
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
            async for chunk in items:
                rest = [i for i in chunk if not self._await(i)]
                del chunk
                await self._route(rest, pack)
                del rest  # not held while the next chunk is awaited (the payload budget)
            if self.mode == "auto":  # the run stayed small: interactive it is
                self._decide("interactive", f"embed.mode is auto and the run had no more than "
                                            f"{self.min_items:,} items (embed.batch_min_items)")
                await self._held.release(self._send_decided, pack, self.driver.outcome)
            if (draft := self.driver.batching.take()) is not None:
                await self.driver.submit(draft)
            for (display_name, name), found in self._adopted.items():
                self.driver.adopt(display_name, name, found,
                                  {i: self._keys[i] for i in found})
            jobs = Counter((display_name, name) for display_name, name, _ in self.awaited.values())
            for (display_name, name), count in jobs.items():
                if (display_name, name) not in self._adopted:
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
        self._adopted.setdefault((display_name, name), {})[item.id] = item
        self._keys[item.id] = key
        if self._budget is not None:
            self._budget.exempt([item])
        return True

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
        batching = self.driver.batching
        direct = []
        for item in chunk:
            if not batching.accepts(item):
                direct.append(item)
            elif (draft := batching.add(item)) is not None:
                await self.driver.submit(draft)
        if direct:
            self.driver.stats.items_fallback += len(direct)
            await pack.send(direct)


async def open_jobs(api: BatchApi, batch_log: BatchLog
                    ) -> dict[str, tuple[str, str, str | None]]:
    """The items earlier runs' open jobs hold (id -> (display name, job name, the content key
    of its request; None in jobs of older versions)). A job recorded as ``submitting`` (the
    run was killed before it heard back) is looked up by its display name: found, it is
    awaited like the others; not found, it was never created."""
    records = await in_thread(batch_log.open)
    awaited: dict[str, tuple[str, str, str | None]] = {}
    listed: dict[str | None, str] | None = None
    for record in records:
        name = record.name
        if name is None:
            if listed is None:
                listed = {job.display_name: job.name for job in await api.list()}
            name = listed.get(record.display_name)
            found = {"status": FAILED} if name is None else {"status": PENDING, "name": name}
            await in_thread(
                functools.partial(batch_log.set, record.display_name, **found))
            if name is None:
                continue
        keys = record.content_keys or (None,) * len(record.item_ids)
        for item_id, key in zip(record.item_ids, keys, strict=False):
            awaited[item_id] = (record.display_name, name, key)
    return awaited


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
