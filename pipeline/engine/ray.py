"""The Ray engine: the local engine's streams on the driver, with the two CPU- and call-heavy
stages on a Ray cluster.

    driver: listing ─▶ [validation tasks on the cluster's CPUs] ─▶ packing ─▶ [embed actors] ─▶ writing
                                                                         │
                                                             one limiter actor (the quota)

- **Validation** runs as Ray tasks, one CPU each: small files in groups, large ones alone (the
  same :func:`~pipeline.stages.validation.groups` as the local engine). Each task is a streaming
  generator that says when it starts a file and hands back the file's entries when it is done,
  so the driver holds each file to its own deadline: past it the task is killed
  (``ray.cancel(force=True)``, which ends its worker process: a parser stuck in C code cannot
  outlive it), the file becomes a ``timeout`` reject and the files after it are sent again. A
  worker or node that dies is not the file's fault: its files are sent again, and only a file
  on which workers died :data:`CRASHES_TO_REJECT` times is rejected (``corrupt``).
- **Embedding calls** go from a pool of async actors. The quota (requests/min, tokens/min,
  requests/day) and the AIMD limit on calls in flight live in **one** :class:`Limiter` actor
  that every call asks first: however many actors and nodes, the cluster sends what one machine
  would. An actor that dies mid-call is restarted by Ray; its batch is sent again, to the next
  actor, after a growing pause while actors are unreachable (the calls in flight when it died
  are the only ones that can be paid twice).
- **Writing stays on the driver**, in the local engine's :class:`~pipeline.stages.writing.Writer`:
  deterministic ids merged, a file's manifest row only after all its rows are committed, stale
  rows removed with a file's last rows, the deletions, the run history and tags. Workers return
  vectors (3 KB each at 768 dimensions), so the driver's share is the Lance commit; see the
  docs/ray.md for where that becomes the bottleneck.

Ray is an optional extra (``pip install 'embedpipe[ray]'``); this module imports it when a run
asks for ``engine: ray``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from pipeline.config import JobConfig
from pipeline.engine.batch import BatchRouter
from pipeline.engine.local import LocalEngine
from pipeline.errors import ClusterError, ConfigError, EmbedError, RejectReason
from pipeline.outcome import RunOutcome
from pipeline.records import Batch, Item, Reject, Vector
from pipeline.stages import Stages
from pipeline.stages.listing import Todo
from pipeline.stages.validation import Sorted
from pipeline.stages.writing import Outcome
from pipeline.state.lock import JobLock
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.ray")

CRASHES_TO_REJECT = 3  # workers that died while on the same file: then it is the file
LOST_IN_A_ROW = 8  # tasks lost with no file started or done in between: the cluster is broken
ACTOR_WAIT_S = 180.0  # how long a batch waits for a live embed actor (a node lost: restarts)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("engine: ray needs Ray: pip install 'embedpipe[ray]'") from None
    if logging.getLogger().handlers:
        # The application set up logging (the CLI's text or JSON lines): Ray's own warnings on
        # the driver go through it too, rather than Ray's handler writing its own format.
        ray_log = logging.getLogger("ray")
        ray_log.handlers.clear()
        ray_log.propagate = True
        ray_log.setLevel(max(ray_log.level, logging.WARNING))
    return ray


def wanted(engine: str) -> bool:
    """Whether a run with ``run.engine: engine`` uses Ray (``auto``: when RAY_ADDRESS names a
    cluster)."""
    return engine == "ray" or (engine == "auto" and bool(os.environ.get("RAY_ADDRESS")))


# --- the limiter actor ---------------------------------------------------------------------------


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


# --- the cluster ---------------------------------------------------------------------------------


class Cluster:
    """The run's handle on Ray: joins ``address`` (or ``RAY_ADDRESS``, or a cluster this
    process already joined), else starts one on this machine for the run; makes the limiter
    and the embed actors, and removes them (and a cluster it started) at the end."""

    def __init__(self, job: JobConfig, client_options: dict[str, Any],
                 address: str | None = None) -> None:
        ray = import_ray()
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            if address:
                reachable(address, job.run.ray_connect_timeout_s)
            with warnings.catch_warnings():
                # Ray starts its daemons by fork+exec, which lancedb warns about needlessly.
                warnings.filterwarnings("ignore", message="lancedb fork support")
                ray.init(address=address,
                         include_dashboard=False, configure_logging=False,
                         log_to_driver=False, ignore_reinit_error=True)
            self.started = True
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        embed = job.embed
        quota = embed.quota
        # The limiter lives on the driver's node: a worker node lost must not take the quota's
        # accounting with it (a restarted limiter would start the minute afresh).
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        limiter_name = f"embedpipe-limiter-{os.getpid()}-{id(self):x}"
        self.limiter = ray.remote(num_cpus=0)(Limiter).options(
            name=limiter_name, max_concurrency=1000, scheduling_strategy=here).remote(
            quota.rpm, quota.tpm, quota.rpd, embed.concurrency)
        # At least two (a call waits for no restart), one per CPU at most, ~4 calls each.
        actors = min(embed.concurrency, max(2, min(self.cpus, math.ceil(embed.concurrency / 4))))
        per_actor = math.ceil(embed.concurrency / actors) + 1
        worker_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(EmbedWorker)
        self.job_ref = ray.put(job)
        # The job by value: an actor restarted after its node died must not need an object
        # that died with the node.
        self.actors = [worker_cls.options(max_concurrency=per_actor).remote(
            job, client_options, limiter_name, i) for i in range(actors)]
        self.validate = ray.remote(num_cpus=1, max_retries=0)(validate_files)
        log.info("ray: %d CPUs, %d embed actors", self.cpus, actors)

    def close(self) -> None:
        for actor in [*self.actors, self.limiter]:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


def reachable(address: str, timeout_s: float) -> None:
    """Raise ClusterError unless the cluster's head answers a TCP connection within
    ``timeout_s`` (``ray.init`` itself retries a wrong address for about 14 minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"the Ray address {address!r} is not HOST:PORT (run.ray_address, "
                           "--address or RAY_ADDRESS)")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"cannot reach the Ray cluster at {address} within {timeout_s:g} s "
                    f"({exc.strerror or exc}): check run.ray_address, --address or RAY_ADDRESS, "
                    "and that the head node is up (run.ray_connect_timeout_s sets the wait)"
                ) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


@contextmanager
def cluster(job: JobConfig, client_options: dict[str, Any],
            address: str | None = None) -> Iterator[Cluster]:
    c = Cluster(job, client_options, address)
    try:
        yield c
    finally:
        c.close()


# --- the engine ----------------------------------------------------------------------------------


class RayEngine(LocalEngine):
    """The local engine, with validation and embedding calls sent to the cluster."""

    name = "ray"

    def __init__(self, job: JobConfig, stages: Stages, stats: RunStats, outcome: RunOutcome, *,
                 lock: JobLock, on_listed: Callable[[], None], cluster: Cluster,
                 retry_rejects: bool = False,
                 on_progress: Callable[[RunStats], None] | None = None,
                 batch: BatchRouter | None = None) -> None:
        super().__init__(job, stages, stats, outcome, lock=lock, on_listed=on_listed,
                         on_progress=on_progress, batch=batch)
        self.cluster = cluster
        self.retry_rejects = retry_rejects
        self._next_actor = 0
        self._crashes: dict[str, int] = {}
        self._lost_in_a_row = 0
        self.resent_batches = 0

    def validate_slots(self) -> int:
        return self.cluster.cpus + 1  # one task queued behind the running ones

    async def _validate(self, todo: ObjectReceiveStream[list[Todo]],
                        items: ObjectSendStream[list[Item]],
                        out: ObjectSendStream[list[Outcome]]) -> None:
        async with todo, items, out:
            async for group in todo:
                rest = list(group)
                while rest:
                    rest = await self._validate_remote(rest, items, out)

    async def _validate_remote(self, todos: list[Todo], items: ObjectSendStream[list[Item]],
                               out: ObjectSendStream[list[Outcome]]) -> list[Todo]:
        """Validate ``todos`` in one task; returns the files still to do (after a timeout or
        a dead worker)."""
        ray = self.cluster.ray
        stage = self.stages.validation
        gen = self.cluster.validate.options(num_returns="streaming").remote(
            self.stats.run_id, self.cluster.job_ref, self.retry_rejects, todos)
        current: int | None = None
        deadline = math.inf
        while True:
            crashed: bool | None = None
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as scope:
                try:
                    ref = await gen.__anext__()
                    message = await ref
                except StopAsyncIteration:
                    return []
                except ray.exceptions.RayTaskError as exc:  # our code raised in the task
                    raise exc.as_instanceof_cause() from None
                except ray.exceptions.RayError as exc:  # the worker or its node is gone
                    if current is not None:
                        uri = todos[current].obj.uri
                        self._crashes[uri] = self._crashes.get(uri, 0) + 1
                        crashed = self._crashes[uri] >= CRASHES_TO_REJECT
                    rest = todos[current:] if current is not None else todos
                    self._lost_in_a_row += 1
                    if self._lost_in_a_row >= LOST_IN_A_ROW:
                        raise ClusterError(f"validation tasks were lost {LOST_IN_A_ROW} times "
                                           f"in a row; the last: {exc}") from None
                    if not crashed:
                        log.warning("a validation worker was lost (%s); sending %d files again",
                                    type(exc).__name__, len(rest))
                        return rest
            if scope.cancelled_caught or crashed:
                if scope.cancelled_caught:
                    ray.cancel(gen, force=True)  # ends the worker process, stuck or not
                assert current is not None
                work = stage.work(todos[current])
                reject = (work.reject(RejectReason.CORRUPT, f"validation workers died "
                                      f"{CRASHES_TO_REJECT} times on this file", 0)
                          if crashed else stage.timeout(work, 0))
                found = Sorted()
                stage.sort(work, [reject], True, found)
                await self._send(found, items, out)
                return todos[current + 1:]
            self._lost_in_a_row = 0
            if message[0] == "start":
                current = message[1]
                deadline = anyio.current_time() + stage.limit_s
                continue
            _, index, obj, entries = message
            work = stage.work(todos[index])
            work.obj = obj
            found = Sorted()
            stage.sort(work, entries, True, found)
            await self._send(found, items, out)
            current, deadline = None, math.inf
            if index + 1 == len(todos):
                return []

    async def _send(self, found: Sorted, items: ObjectSendStream[list[Item]],
                    out: ObjectSendStream[list[Outcome]]) -> None:
        if found.items:
            await items.send(found.items)
        if found.outcomes:
            await out.send(list(found.outcomes))

    async def _embed_call(self, batch: Batch) -> tuple[list[Vector], list[Reject]]:
        """One batch through an embed actor. An actor that died, or is unreachable while Ray
        restarts it (its node lost: detecting that and rescheduling takes seconds), is not
        the batch's fault: the batch goes to the next actor, after a growing pause, for up to
        :data:`ACTOR_WAIT_S`; then the run fails (exit 3), blaming no file."""
        ray = self.cluster.ray
        give_up = anyio.current_time() + ACTOR_WAIT_S
        pause = 0.25
        while True:
            actor = self.cluster.actors[self._next_actor % len(self.cluster.actors)]
            self._next_actor += 1
            try:
                vectors, rejects, counts, failure = await actor.embed.remote(batch)
            except ray.exceptions.RayActorError as exc:
                if anyio.current_time() + pause > give_up:
                    raise ClusterError(f"no embed actor answered for {ACTOR_WAIT_S:.0f} s; "
                                       f"the last error: {type(exc).__name__}") from None
                self.resent_batches += 1
                log.warning("an embed actor died or is restarting (%s); sending its batch of "
                            "%d again in %.1f s", type(exc).__name__, len(batch.items), pause)
                await anyio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            counts.add_to(self.stats)
            if failure is not None:
                raise failure
            return vectors, rejects
