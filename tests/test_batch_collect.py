"""The collector of Batch API jobs (pipeline.engine.batch_collect): looks from a task of its own
while the routing goes on, when a job is open, backing off; a look under way ends before
leaving; a look that fails stops the routing."""

from __future__ import annotations

import anyio
import pytest

from pipeline.engine import batch_collect
from pipeline.engine.batch_collect import BusyTime, Collector


class _Jobs:
    """Looks that the test can hold, each saying whether a job is still open."""

    def __init__(self, open_after: list[bool]) -> None:
        self.open_after = open_after
        self.at: list[float] = []  # when each look began
        self.ended = 0
        self.gate: anyio.Event | None = None
        self.fail = False

    async def look(self) -> bool:
        self.at.append(anyio.current_time())
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("polling a job: 403 PERMISSION_DENIED")
        self.ended += 1
        return self.open_after.pop(0)


def test_it_looks_once_a_job_is_open_backing_off_and_not_while_none_is():
    jobs = _Jobs([True, True, False, False])
    collector = Collector(0.04, 0.08)
    seen: dict[str, object] = {}

    async def main() -> None:
        async with collector.running(jobs.look):
            await anyio.sleep(0.1)
            seen["no job open"] = len(jobs.at)
            submitted = anyio.current_time()
            collector.look_soon()  # a job submitted: looked at after the backoff's wait
            for _ in range(3):
                await collector.looked()
            seen["first look after"] = jobs.at[0] - submitted
            seen["gaps"] = [b - a for a, b in zip(jobs.at, jobs.at[1:], strict=False)]
            await anyio.sleep(0.2)
            seen["none open any more"] = len(jobs.at)
            collector.look_soon(0)  # an earlier run's job adopted: looked at at once
            await collector.looked()
        seen["looks"] = len(jobs.at)

    anyio.run(main)
    assert seen["no job open"] == 0
    assert seen["first look after"] >= 0.039
    # each wait half as long again as the one before, up to the longest (0.08)
    first, second = seen["gaps"]  # type: ignore[misc]
    assert first >= 0.059 and second >= 0.079
    assert seen["none open any more"] == 3
    assert seen["looks"] == 4 and jobs.ended == 4


def test_leaving_lets_a_look_under_way_end_and_starts_none_after():
    jobs = _Jobs([True, True])
    jobs.gate = anyio.Event()
    collector = Collector(0.01, 0.01)
    seen: dict[str, object] = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            async def release() -> None:
                await anyio.sleep(0.1)
                seen["ended before release"] = jobs.ended
                assert jobs.gate is not None
                jobs.gate.set()

            async with collector.running(jobs.look):
                collector.look_soon(0)
                while not jobs.at:
                    await anyio.sleep(0.001)
                tg.start_soon(release)
            # left only once the look under way ended, though a job is still open
            seen["left"] = (jobs.ended, collector.active)
        await anyio.sleep(0.05)
        seen["after"] = len(jobs.at)

    anyio.run(main)
    assert seen["ended before release"] == 0
    assert seen["left"] == (1, False)
    assert seen["after"] == 1


def test_a_look_that_fails_stops_the_routing_with_its_error():
    jobs = _Jobs([True])
    jobs.fail = True
    collector = Collector(0.01, 0.01)
    routed: list[int] = []

    async def main() -> None:
        async with collector.running(jobs.look):
            collector.look_soon(0)
            for n in range(1000):  # the routing, going on until cancelled
                routed.append(n)
                await anyio.sleep(0.01)

    with pytest.raises(Exception) as caught:
        anyio.run(main)
    failed = caught.value
    errors = failed.exceptions if isinstance(failed, BaseExceptionGroup) else [failed]
    assert [str(e) for e in errors] == ["polling a job: 403 PERMISSION_DENIED"]
    assert 0 < len(routed) < 1000


def test_busy_time_counts_overlapping_stretches_once(monkeypatch: pytest.MonkeyPatch):
    """Two downloads at once, then one alone: the busy time is the union of their spans."""
    clock = [0.0]
    monkeypatch.setattr(batch_collect.time, "perf_counter", lambda: clock[0])
    stretches: list[float] = []
    busy = BusyTime(stretches.append)
    first, second, third = busy.during(), busy.during(), busy.during()
    first.__enter__()  # 0 s
    clock[0] = 1.0
    second.__enter__()  # 1 s, while the first is on
    clock[0] = 3.0
    first.__exit__(None, None, None)
    clock[0] = 4.0
    second.__exit__(None, None, None)  # busy from 0 to 4 s
    clock[0] = 10.0
    third.__enter__()
    clock[0] = 12.5
    third.__exit__(None, None, None)
    assert stretches == [4.0, 2.5]
