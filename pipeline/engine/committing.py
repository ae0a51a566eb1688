"""The local engine's writer: the outcomes of every stage in, committed in batches (every
``run.flush_rows`` rows, and at least every ``run.flush_interval_s``), and at the end of a run
that went to the end, the rows of the files gone from the source deleted. It runs outside the
producers' cancel scope: a run stopped early still commits what was done."""

from __future__ import annotations

import logging

import anyio
from anyio.abc import ObjectReceiveStream

from pipeline.config import JobConfig
from pipeline.memory import in_thread, release_free_memory
from pipeline.outcome import RunOutcome
from pipeline.stages import Stages
from pipeline.stages.reuse import with_copies
from pipeline.stages.writing import Outcome
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.run")


class Committer:
    def __init__(self, job: JobConfig, stages: Stages, stats: RunStats,
                 outcome: RunOutcome) -> None:
        self.job = job
        self.stages = stages
        self.stats = stats
        self.outcome = outcome

    async def run(self, out: ObjectReceiveStream[list[Outcome]], done: anyio.Event) -> None:
        """Take outcomes until the stream ends; then, if the run went to the end, delete the
        rows of the files gone from the source. ``done`` is set however it ends."""
        writer = self.stages.writer
        cfg = self.job.run
        try:
            async with out:
                flushed = anyio.current_time()
                while True:
                    # flush_interval_s is the oldest a buffered row gets, even while rows keep
                    # coming (an idle timer would never fire under a steady trickle)
                    wait = max(0.0, cfg.flush_interval_s - (anyio.current_time() - flushed))
                    entries = None
                    with anyio.move_on_after(wait):
                        try:
                            entries = await out.receive()
                        except anyio.EndOfStream:
                            break
                    for entry in entries or ():
                        for row in with_copies(self.stages.reuse, entry):
                            writer.add(row)
                    due = anyio.current_time() - flushed >= cfg.flush_interval_s
                    if due or writer.rows >= cfg.flush_rows:
                        await in_thread(self.flush)
                        self.stages.reuse.retire(writer.take_flushed_keys())
                        flushed = anyio.current_time()
            await in_thread(self.flush)
            self.stages.reuse.retire(writer.take_flushed_keys())
            if self.stages.reuse.waiting:
                log.info("%d items wait for the vector of the same content sent by another "
                         "file, which did not come in this run: the next run does their files",
                         self.stages.reuse.waiting)
            # Only a run that went to the end deletes: a gone file's rows may hold the content
            # a moved file, not done yet, reuses.
            if (self.stats.listing_done and cfg.on_delete == "delete"
                    and self.outcome.fatal is None and not self.outcome.interrupted):
                listing = self.stages.listing
                refusal = await in_thread(
                    writer.delete, listing.gone(), listing.known, self.stats.files_seen)
                if refusal is not None:
                    self.outcome.deletion_refused = True
                    self.outcome.failed(refusal)
        finally:
            done.set()

    def flush(self) -> None:
        writer = self.stages.writer
        rows, files = len(writer.vectors) + len(writer.rejects), len(writer.completed)
        writer.flush()
        release_free_memory()  # what the flush and the calls since the last one freed
        if rows or files:
            log.info("committed %d rows and %d files' manifest rows (%d files done)", rows,
                     files, self.stats.files_done)
