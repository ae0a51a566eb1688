"""Validation in worker threads under the per-file deadline: how the local engine enforces
:attr:`pipeline.stages.validation.Validation.limit_s`.

A thread cannot be ended from outside. A file that outlives its deadline becomes a ``timeout``
reject and its thread is abandoned (it finishes on its own, or never). anyio's worker threads
are not daemons, so the interpreter would wait for such a thread at exit: :func:`threads_left`
tells the CLI, which ends the process itself once everything is committed and printed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from pipeline.memory import in_thread
from pipeline.records import Item
from pipeline.stages.listing import Todo
from pipeline.stages.validation import FileWork, GroupWork, Sorted, Validation
from pipeline.stages.writing import Outcome

_T = TypeVar("_T")


class _ThreadCalls:
    """Counts validation calls still running in worker threads."""

    def __init__(self) -> None:
        self.running = 0
        self._lock = threading.Lock()

    def __call__(self, fn: Callable[[], _T]) -> _T:
        with self._lock:
            self.running += 1
        try:
            return fn()
        finally:
            with self._lock:
                self.running -= 1


_CALLS = _ThreadCalls()


def threads_left() -> int:
    """Validation calls still running in threads a run gave up on."""
    return _CALLS.running


async def fit_group(stage: Validation, works: list[FileWork],
                    out: Sorted) -> list[FileWork]:
    """Validate small files in one thread hop, sorting what they give into ``out``. If the file
    in progress outlives the limit, it becomes a timeout reject and the files after it are
    returned, to be done one by one."""
    group = GroupWork(works)
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            while not group.overdue(stage.limit_s):
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await in_thread(_CALLS, group.run, abandon_on_cancel=True)
        tg.cancel_scope.cancel()
    finished, rest = group.stop()
    for work, entries in finished:
        stage.sort(work, entries, True, out)
    if not rest:
        return []
    stage.sort(rest[0], [stage.timeout(rest[0], 0)], True, out)
    return rest[1:]


async def fit_file(stage: Validation, work: FileWork, deadline: float) -> tuple[Sorted, bool]:
    """The next chunk of one file, sorted, and whether the file is done. Past ``deadline``
    (anyio's clock) the hop is abandoned and the file ends with a timeout reject."""
    out = Sorted()
    with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as scope:
        chunk, done = await in_thread(_CALLS, work.step, abandon_on_cancel=True)
    if scope.cancelled_caught:
        chunk, done = [stage.timeout(work, work.count)], True
    stage.sort(work, chunk, done, out)
    return out, done


async def validate_groups(stage: Validation, todo: ObjectReceiveStream[list[Todo]],
                          items: ObjectSendStream[list[Item]],
                          out: ObjectSendStream[list[Outcome]],
                          groups_one_at_a_time: anyio.Lock | None = None) -> None:
    """A validation task of the local engine: groups of files in, items and file outcomes out,
    each file held to its deadline. With ``groups_one_at_a_time`` (shared by the tasks), groups
    of small files take turns: where reading them waits on nothing, threads would only pass
    the GIL to one another (4 threads cost 15 % more CPU than 1 over 20,000 texts)."""

    async def send(sorted_: Sorted) -> None:
        if sorted_.items:
            await items.send(sorted_.items)
        if sorted_.outcomes:
            await out.send(list(sorted_.outcomes))

    async with todo, items, out:
        async for group in todo:
            works = [stage.work(entry) for entry in group]
            if len(works) > 1:
                await stage.budget.room()
                found = Sorted()
                async with groups_one_at_a_time or contextlib.nullcontext():
                    works = await fit_group(stage, works, found)
                await send(found)
                del found  # downstream's now: not held here while waiting for room
            for work in works:
                await stage.budget.room()
                deadline = anyio.current_time() + stage.limit_s
                done = False
                while not done:
                    found, done = await fit_file(stage, work, deadline)
                    # waiting for room downstream is not the file's time
                    waited = anyio.current_time()
                    own = stage.budget.footprint(found.items[-1:])  # the validator's last
                    await send(found)
                    del found
                    if not done:
                        await stage.budget.room(own)
                    deadline += anyio.current_time() - waited
