"""How a run ends: its exit code, and why it stopped early if it did.

The engine records what stopped a run (a signal, a per-day quota, an error that is no file's
fault, deletions refused); the run's bookkeeping turns it into the exit code, the ``runs`` row's
status and the report's problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import AccessError, EmbedError, PipelineError, QuotaExhausted

EXIT_OK = 0  # finished: everything embedded or rejected (rejects are in the summary/report)
# 1 is never a run's: it is what Python (and Ray) exit with on a crash, so it cannot mean "done".
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_QUOTA = 4
EXIT_LOCKED = 5
EXIT_PENDING = 6  # `run --detach`: Batch API jobs are running; the next run collects them
EXIT_INTERNAL = 70  # an unexpected error (a bug): sysexits' EX_SOFTWARE; nothing is deleted
EXIT_INTERRUPTED = 130


def exit_code_for(exc: BaseException) -> int:
    """The exit code of a run or command that ended with ``exc`` (the one rule, for the CLI and
    the ``runs`` row alike)."""
    from pipeline.errors import ConfigError
    from pipeline.state.lock import JobLocked

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, JobLocked):
        return EXIT_LOCKED
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    if isinstance(exc, QuotaExhausted):
        return EXIT_QUOTA
    if isinstance(exc, PipelineError):
        return EXIT_FAILED
    return EXIT_INTERNAL


def run_status(code: int) -> str:
    """The ``runs`` table's status for a run that ended with this exit code."""
    return {EXIT_OK: "finished", EXIT_QUOTA: "quota",
            EXIT_INTERRUPTED: "stopped", EXIT_PENDING: "pending"}.get(code, "failed")


@dataclass
class RunOutcome:
    interrupted: bool = False
    quota_error: QuotaExhausted | None = None
    # An error that is no file's fault (the key, the endpoint, the API down): the run stops,
    # blames no file and deletes nothing.
    fatal: PipelineError | None = None
    failure: str | None = None  # why the run failed, one line (also among the problems)
    failed_items: int = 0
    deletion_refused: bool = False
    problems: list[str] = field(default_factory=list)

    def stopped_by(self, exc: EmbedError, items: int, attempts: int) -> None:
        """An embedding call failed in a way no retry or bisection fixes: a per-day quota
        (exit 4), or an error that is no file's fault (exit 3: a wrong key or model, or the API
        still failing after every attempt); the items stay to do."""
        if isinstance(exc, QuotaExhausted):
            self.quota_error = exc
        else:
            self.fail(exc, items, "" if isinstance(exc, AccessError)
                      else f"after {attempts} attempts")

    def fail(self, exc: PipelineError, items: int, how: str = "") -> None:
        self.failed_items += items
        self._stop(exc, f"the embedding API failed{' ' + how if how else ''}: {exc}")

    def source_failed(self, exc: PipelineError) -> None:
        """The source could not be read (its store, its credentials, its share): the run
        stops (exit 3); the files not read are the next run's."""
        self._stop(exc, f"the source failed: {exc}")

    def _stop(self, exc: PipelineError, what: str) -> None:
        if self.fatal is None:
            self.fatal = exc
            self.failed(f"{what}; nothing was stored against the files and nothing was "
                        "deleted: run the job again once this is fixed")

    def failed(self, why: str) -> None:
        self.failure = why  # the CLI prints it once; the report lists it among the problems
        self.problems.append(why)

    def exit_code(self, pending_jobs: int = 0) -> int:
        if self.fatal is not None:
            return EXIT_FAILED
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.quota_error is not None:
            return EXIT_QUOTA
        if pending_jobs:
            return EXIT_PENDING
        if self.failed_items or self.deletion_refused:
            return EXIT_FAILED
        return EXIT_OK
