"""What runs on the cluster's workers: the embed actors (:class:`EmbedWorker`) and the
validation tasks (:func:`validate_files`), each returning values the driver can trust (the
pipeline's own errors, not Ray's wrapping of them)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import JobConfig
from pipeline.engine.ray.limiter import _RemoteRate, _RemoteSlots
from pipeline.errors import EmbedError
from pipeline.records import Batch, Reject, Vector
from pipeline.stages.listing import Todo
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.ray")


@dataclass
class CallCounts:
    """What an actor's calls added to the run's counters since it last reported."""

    api_calls: int = 0
    http_429: int = 0
    retries: int = 0
    latencies: list[float] = field(default_factory=list)

    def add_to(self, stats: RunStats) -> None:
        stats.api_calls += self.api_calls
        stats.http_429 += self.http_429
        stats.retries += self.retries
        for seconds in self.latencies:
            stats.record_call(seconds)


class EmbedWorker:
    """An embed actor: the local :class:`~pipeline.stages.embedding.Embedder`, its quota and
    concurrency asked of the limiter actor. Returns failures as values (``EmbedError``), so the
    driver sees the pipeline's own error, not Ray's wrapping of it."""

    def __init__(self, job: JobConfig, client_options: dict[str, Any], limiter: str,
                 index: int) -> None:
        self.job = job
        self.index = index  # the same after a restart: the limiter knows its slots by it
        self.client_options = client_options
        self.limiter_name = limiter  # by name: a handle argument would pin a restart to it
        self.stats = RunStats(run_id="actor")
        self.embedder: Any = None
        self._making: Any = None

    async def _embedder(self) -> Any:
        """Made once, in the actor's event loop, by the first call (the others wait for it)."""
        if self.embedder is None:
            import asyncio

            if self._making is None:
                self._making = asyncio.ensure_future(self._make())
            await self._making
        return self.embedder

    async def _make(self) -> None:
        import ray

        from pipeline.gemini.client import GeminiClient
        from pipeline.gemini.tasks import TaskStyle
        from pipeline.models import model_spec
        from pipeline.stages.embedding import Embedder

        embed = self.job.embed
        has_quota = embed.quota.is_set
        self.limiter = ray.get_actor(self.limiter_name)
        freed = await self.limiter.restarted.remote(self.index)
        if freed:
            log.warning("embed actor %d restarted: %d call slots of its last life freed",
                        self.index, freed)
        self.embedder = Embedder(
            GeminiClient(**self.client_options), model_spec(embed.model),
            style=TaskStyle.for_job(self.job), max_attempts=embed.max_attempts,
            stats=self.stats, max_quota_wait_s=embed.max_quota_wait_s,
            backoff_base_s=embed.backoff_base_s, backoff_cap_s=embed.backoff_cap_s,
            limiter=_RemoteRate(self.limiter) if has_quota else None,
            concurrency=_RemoteSlots(self.limiter, self.index))

    async def embed(self, batch: Batch) -> tuple[list[Vector], list[Reject], CallCounts,
                                                 EmbedError | None]:
        try:
            vectors, rejects = await (await self._embedder()).embed_batch(batch)
            failure = None
        except EmbedError as exc:
            vectors, rejects, failure = [], [], exc
        return vectors, rejects, self._drain(), failure

    def _drain(self) -> CallCounts:
        s = self.stats
        counts = CallCounts(s.api_calls, s.http_429, s.retries, s.call_latencies)
        s.api_calls = s.http_429 = s.retries = 0
        s.call_latencies = []
        return counts


# --- validation tasks ----------------------------------------------------------------------------

_WORKER_STAGE: dict[str, Any] = {}


def _worker_stage(run_id: str, job: JobConfig, retry_rejects: bool) -> Any:
    """This worker process's validation stage for the run (made once per process and run)."""
    if run_id not in _WORKER_STAGE:
        from connectors import connector_for
        from pipeline.stages.companions import Companions
        from pipeline.stages.validation import Validation

        connector = connector_for(job)
        companions = Companions(connector, job.source.sidecar, job.source.metadata)
        _WORKER_STAGE.clear()
        _WORKER_STAGE[run_id] = Validation(job, connector, companions, RunStats(run_id="worker"),
                                        retry_rejects=retry_rejects)
    return _WORKER_STAGE[run_id]


def validate_files(run_id: str, job: JobConfig, retry_rejects: bool,
                   todos: list[Todo]) -> Iterator[tuple[Any, ...]]:
    """A Ray streaming task: ``("start", i)`` as file ``i`` begins, ``("done", i, obj,
    entries)`` when it is validated (``obj`` with the version the read found)."""
    stage = _worker_stage(run_id, job, retry_rejects)
    for i, todo in enumerate(todos):
        yield ("start", i)
        work = stage.work(todo)
        entries = work.finish()
        yield ("done", i, work.obj, entries)

