"""The Ray engine on the driver: the local engine's streams, with validation sent to tasks on
the cluster (each file held to its deadline, a lost worker's files sent again) and the calls
to the embed actors (a dead actor's batch sent to the next one)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from pipeline.config import JobConfig
from pipeline.engine.batch import BatchRouter
from pipeline.engine.local import LocalEngine
from pipeline.engine.ray.cluster import Cluster
from pipeline.errors import ClusterError, PipelineError, RejectReason
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
                    if isinstance(exc.cause, PipelineError):
                        raise exc.cause from None  # its one line, not the task's traceback
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
