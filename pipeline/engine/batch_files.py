"""The Files API's storage given back: the files of Batch API jobs the batch log has closed
(:mod:`pipeline.state.batches`) deleted from the service, while a run goes on. Google keeps a
file 48 hours and caps a project's files (20 GB): a backfill that left each job's input and
responses there would have its uploads refused before it ended."""

from __future__ import annotations

import logging
from datetime import timedelta

from pipeline.errors import EmbedError, TransientEmbedError
from pipeline.gemini.batches import BatchApi, BatchJob
from pipeline.memory import in_thread
from pipeline.state.batches import BatchLog
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.batch")

# How long Google keeps a Files API file: older jobs' files are gone without being deleted.
FILE_RETENTION = timedelta(hours=48)


def _gone(exc: EmbedError) -> bool:
    """Whether the service no longer has what was asked for: 404, or Google's 403 for a file
    it has deleted ("You do not have permission to access the File ... or it may not
    exist"), not a 403 about the key."""
    return exc.http_status == 404 or (exc.http_status == 403
                                      and "not exist" in exc.message.lower())


class ServiceFiles:
    def __init__(self, api: BatchApi, batch_log: BatchLog, stats: RunStats) -> None:
        self.api = api
        self.log = batch_log
        self.stats = stats
        self._failed = False  # deleting files failed: not tried again this run
        self._errors = 0

    async def release(self, *, last: bool = False) -> None:
        """Delete from the service the files of the jobs the batch log has closed: a job's
        uploaded input and its responses, once its rows are committed (``collected``: not
        before, or a run killed in between could not collect them again), or once it ended
        without them (``failed``, ``superseded``). Google keeps a file 48 hours and caps a
        project's files (20 GB), so a backfill that left them would have its uploads refused
        before it ended. A file already gone counts as deleted. Any other failure leaves the
        files for a later call (after an error that is not transient, three that are, or one
        in the run's ``last`` call: the next run's), with a warning, not a failed run: the
        results are safe, and Google deletes the files in time."""
        if self._failed:
            return
        released: list[str] = []
        try:
            for record in await in_thread(self.log.releasable, FILE_RETENTION):
                files = [record.input_file] if record.input_file else []
                if record.name is not None:
                    info = await self._job_or_none(record.name)
                    if info is not None and info.responses_file:
                        files.append(info.responses_file)
                for name in files:
                    await self._delete(name)
                released.append(record.display_name)
        except EmbedError as exc:
            self._errors += 1
            if (last or not isinstance(exc, TransientEmbedError)
                    or self._errors >= 3):
                self._failed = True
                message = (f"could not delete the files of finished Batch API jobs from the "
                           f"service ({exc}): the next run tries again; Google deletes them "
                           "after 48 h")
                log.warning("%s", message)
                self.stats.upkeep_warnings.append(message)
        if released:
            await in_thread(self.log.released, released)
            self.stats.batch_files_released += len(released)
            log.info("deleted the files of %d finished Batch API jobs from the service",
                     len(released))

    async def _job_or_none(self, name: str) -> BatchJob | None:
        try:
            return await self.api.get(name)
        except EmbedError as exc:
            if _gone(exc):
                return None
            raise

    async def _delete(self, name: str) -> None:
        try:
            await self.api.delete(name)
        except EmbedError as exc:
            if not _gone(exc):
                raise
