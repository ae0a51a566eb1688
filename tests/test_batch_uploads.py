"""The uploader of Batch API jobs (pipeline.engine.batch_uploads): a job on the wire while the
next is filled, one at a time, in order; an error stops the routing; nothing handed over is left
unsubmitted or unclosed."""

from __future__ import annotations

import anyio
import pytest

from pipeline.engine.batch_uploads import Uploader
from pipeline.gemini.batches import JobInput
from pipeline.stages.batching import JobDraft


def _draft(name: str, held: int) -> JobDraft:
    lines = JobInput()
    lines.add(name, {"content": {"parts": [{"text": name}]}})
    return JobDraft(name, lines, held_bytes=held)


class _Wire:
    """Submissions that last until the test lets each one through."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.started: list[str] = []
        self.done: list[str] = []
        self.gates: dict[str, anyio.Event] = {}
        self.fail_on = fail_on

    def gate(self, name: str) -> anyio.Event:
        return self.gates.setdefault(name, anyio.Event())

    async def submit(self, draft: JobDraft) -> None:
        self.started.append(draft.display_name)
        await self.gate(draft.display_name).wait()
        if draft.display_name == self.fail_on:
            raise RuntimeError(f"the service refused {draft.display_name}")
        self.done.append(draft.display_name)
        draft.lines.close()


def test_a_job_is_filled_while_the_one_before_it_is_on_the_wire():
    wire = _Wire()
    uploader = Uploader(wire.submit)
    seen: dict[str, object] = {}

    async def main() -> None:
        async with uploader.running():
            await uploader.hand(_draft("job-1", 100))
            # handed over at once: job-1 uploads while the routing goes on
            await anyio.wait_all_tasks_blocked()
            seen["while job-1 uploads"] = (list(wire.started), list(wire.done),
                                           uploader.busy, uploader.held_bytes)
            async with anyio.create_task_group() as tg:
                handed = anyio.Event()

                async def second() -> None:
                    await uploader.hand(_draft("job-2", 50))
                    handed.set()

                tg.start_soon(second)
                await anyio.wait_all_tasks_blocked()
                # job-2 waits to be taken while job-1 is still on the wire
                seen["job-2 waiting"] = (handed.is_set(), uploader.busy, uploader.held_bytes)
                wire.gate("job-1").set()
                await handed.wait()
            await anyio.wait_all_tasks_blocked()
            seen["job-2 uploads"] = (list(wire.started), list(wire.done))
            wire.gate("job-2").set()
        seen["left"] = (list(wire.done), uploader.busy, uploader.held_bytes)

    anyio.run(main)
    assert seen["while job-1 uploads"] == (["job-1"], [], 1, 100)
    assert seen["job-2 waiting"] == (False, 2, 150)
    assert seen["job-2 uploads"] == (["job-1", "job-2"], ["job-1"])
    # leaving waits until every job handed over is submitted
    assert seen["left"] == (["job-1", "job-2"], 0, 0)


def test_a_job_the_service_refuses_stops_the_routing_and_no_draft_is_left_open():
    wire = _Wire(fail_on="job-1")
    uploader = Uploader(wire.submit)
    waiting = _draft("job-2", 50)
    routed_after_failure = []

    async def main() -> None:
        async with uploader.running():
            await uploader.hand(_draft("job-1", 100))
            await anyio.wait_all_tasks_blocked()
            wire.gate("job-1").set()
            await uploader.hand(waiting)  # never taken: the uploader has failed
            routed_after_failure.append(True)

    with pytest.raises(BaseExceptionGroup) as caught:
        anyio.run(main)
    assert [str(e) for e in caught.value.exceptions] == ["the service refused job-1"]
    assert routed_after_failure == [] and wire.done == []
    assert uploader.busy == 0 and uploader.held_bytes == 0
    assert waiting.lines._file.closed  # its spooled input let go, nothing of it was sent


def test_outside_running_a_job_is_submitted_by_the_caller():
    wire = _Wire()
    uploader = Uploader(wire.submit)
    wire.gate("job-1").set()
    anyio.run(uploader.hand, _draft("job-1", 10))
    assert wire.done == ["job-1"] and uploader.busy == 0
