"""A Batch API job on the wire while the next one is filled.

Submitting a job is an upload of its JSONL input (hundreds of MB for media) and a create call:
done in the routing task, it held up everything behind it — no item was routed, no job filled,
validation stopped once its queues were full — for as long as the upload took. An
:class:`Uploader` runs submissions in a task of their own, one at a time, in the order they
were handed over: handing a job over waits only while the one before it is still on the wire,
so at most two full jobs are out of the batch log's ``open`` list at once (one uploading, one
handed over), and their items count in :attr:`Uploader.held_bytes`.

A submission that fails (the service refused it, the network went) fails the task group, and
with it the routing: the run stops as it did when the routing submitted itself. A job recorded
``submitting`` whose upload was cut is looked up by its display name by the next run
(:func:`pipeline.engine.batch_driver.open_jobs`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from pipeline.stages.batching import JobDraft


class Uploader:
    def __init__(self, submit: Callable[[JobDraft], Awaitable[None]]) -> None:
        self._submit = submit
        self._drafts: ObjectSendStream[JobDraft] | None = None
        self.held_bytes = 0  # what the items of the jobs handed over and not submitted hold
        self.busy = 0  # jobs handed over and not submitted yet

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """While open, :meth:`hand` gives jobs to the uploading task; on leaving, every job
        handed over has been submitted."""
        send, receive = anyio.create_memory_object_stream[JobDraft](0)
        # The receiving end is closed here, after the task: a task that failed leaves a job
        # being handed over waiting until the task group cancels it (the error is the task's
        # alone, not also a broken stream's).
        with send, receive:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._upload, receive)
                self._drafts = send
                try:
                    yield
                finally:
                    self._drafts = None
                    send.close()  # the task ends once it has submitted what it took

    async def hand(self, draft: JobDraft) -> None:
        """Submit ``draft``: by the uploading task while :meth:`running`, else here."""
        if self._drafts is None:
            await self._submit(draft)
            return
        self.held_bytes += draft.held_bytes
        self.busy += 1
        try:
            await self._drafts.send(draft)  # waits while the job before it is on the wire
        except BaseException:  # not taken (the run stops): nothing of it was sent
            self.held_bytes -= draft.held_bytes
            self.busy -= 1
            draft.lines.close()
            raise

    async def _upload(self, drafts: ObjectReceiveStream[JobDraft]) -> None:
        async for draft in drafts:
            try:
                await self._submit(draft)
            finally:
                self.held_bytes -= draft.held_bytes
                self.busy -= 1
