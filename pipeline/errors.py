"""One exception hierarchy for the whole pipeline.

Errors are converted once, at the boundary where they enter (HTTP, file system, parser,
Lance), and chained with ``raise ... from exc``::

    PipelineError
    ├── ConfigError           a job file that cannot be used (exit code 2)
    ├── ConnectorError        a source that cannot be listed, or a file that cannot be read
    │   └── SourceUnavailable     the source itself failed (its store unreachable or failing,
    │       │                     its credentials, its bucket or root gone): no file's fault;
    │       │                     the run stops (exit 3), blames no file, deletes nothing
    │       └── TransientConnectorError   unreachable, timed out, 5xx: may pass if tried again
    ├── ItemRejected          one file (or part) that cannot be embedded: becomes a reject row
    ├── EmbedError            a call to the embedding API failed
    │   ├── TransientEmbedError   429, 5xx, transport: worth retrying
    │   │   └── QuotaExhausted        a per-day quota: stop the run cleanly (exit 4)
    │   │       ├── Throttled             429s for longer than embed.max_quota_wait_s
    │   │       └── BalanceExhausted      a gateway account's balance or quota is used up
    │   ├── AccessError           the key, permission, model or endpoint is wrong: the call's
    │   │                         fault, never an item's; the run stops (exit 3)
    │   │   └── EndpointMismatch      the endpoint answers, but not in Gemini's API (a wrong
    │   │                             base_url): an OpenAI-style body, an HTML page
    │   └── TerminalEmbedError    a 400 about the request's content: bisected to find the item
    └── SinkError             the table could not be written

``Transient`` is a marker: code decides retries by ``isinstance(exc, Transient)``, never by
names or messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class PipelineError(Exception):
    """Base of every error this project raises on purpose."""


class Transient:
    """Marker mixin: the operation may succeed if tried again."""


class ConfigError(PipelineError):
    """A job file that cannot be loaded; the message names the file, the key path and the problem."""


class ConnectorError(PipelineError):
    """A source that cannot be listed or read."""

    def __init__(self, message: str, *, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri


class SourceUnavailable(ConnectorError):
    """The source failed, not the file being read: the store cannot be reached or keeps
    failing, its credentials are refused or expired, its bucket or root folder is gone. Never a
    reject: the run stops, stores nothing against the file and deletes nothing."""


class TransientConnectorError(SourceUnavailable, Transient):
    """The store cannot be reached, timed out or answered 5xx (after the client's retries)."""


class RejectReason:
    """The documented list of reject reason codes (a closed set, stored in the ``reason`` column)."""

    CORRUPT = "corrupt"
    ENCRYPTED = "encrypted"
    UNSUPPORTED = "unsupported"
    TOO_LONG = "too_long"
    TOO_LARGE = "too_large"
    UNREADABLE = "unreadable"
    EMPTY = "empty"
    TIMEOUT = "timeout"
    API_REJECTED = "api_rejected"

    ALL = frozenset(
        {
            CORRUPT,
            ENCRYPTED,
            UNSUPPORTED,
            TOO_LONG,
            TOO_LARGE,
            UNREADABLE,
            EMPTY,
            TIMEOUT,
            API_REJECTED,
        }
    )


class NotRunYet(ConfigError):
    """A command that reads the job's tables, before the job's first run."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}: the job has not run yet (embedpipe run JOB first)")


class ItemRejected(PipelineError):
    """A file or part that will not be embedded; ``reason`` is one of :class:`RejectReason`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in RejectReason.ALL:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class ApiStatus:
    """What Google's error body said: HTTP code, canonical status and message."""

    http_status: int | None
    status: str | None
    message: str


class EmbedError(PipelineError):
    """A call to the embedding API failed. Never carries the API key in its text."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        status: str | None = None,
        retry_after_s: float | None = None,
        quota_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.status = status
        self.retry_after_s = retry_after_s
        self.quota_id = quota_id

    def __str__(self) -> str:
        head = " ".join(str(p) for p in (self.http_status, self.status) if p is not None)
        return f"{head}: {self.message}" if head else self.message


class TransientEmbedError(EmbedError, Transient):
    """429, 5xx or a transport failure: worth retrying after a delay."""


class QuotaExhausted(TransientEmbedError):
    """A per-day quota is used up: retrying today is pointless; the run stops cleanly."""

    def advice(self, when: str) -> str:
        """What the operator reads after the run stopped (``when``: the reset's time)."""
        return (f"per-day quota exhausted ({self}); everything done so far is saved; the quota "
                f"resets {when}: run the job again then and it continues where it stopped")


class Throttled(QuotaExhausted):
    """Every call was answered 429 for longer than ``embed.max_quota_wait_s``: the endpoint
    (or a gateway before it) keeps refusing; the run stops cleanly rather than hammer it."""

    def advice(self, when: str) -> str:
        return (f"the endpoint kept answering 429 ({self}); everything done so far is saved: "
                "run the job again later (or lower embed.concurrency / set embed.quota) and it "
                "continues where it stopped")


class BalanceExhausted(QuotaExhausted):
    """A gateway says its account's balance (or the token's quota) is used up."""

    def advice(self, when: str) -> str:
        return (f"the gateway account's balance is exhausted ({self}): top it up, then run "
                "again; everything done so far is saved and the run continues where it stopped")


class AccessError(EmbedError):
    """The API refused the call for what it is sent with, not what it holds: a wrong, expired,
    leaked or missing key (401, 403, 400 API_KEY_INVALID), a model the endpoint does not serve
    (404). Every other call would fail the same way: the run stops and no file is blamed."""


class EndpointMismatch(AccessError):
    """A 200 that is not a Gemini answer (an OpenAI-style embeddings list, an HTML page): the
    base URL points at something else. No retry can help; the run stops (exit 3)."""


class TerminalEmbedError(EmbedError):
    """A 4xx about the request's content (a 400 INVALID_ARGUMENT): retrying cannot help."""


# Where Lance's Rust code was built ("..., /home/runner/work/lance/lance/rust/lance/src/x.rs:12:5"):
# noise to an operator, cut from sink errors.
_BUILD_PATH = re.compile(r",?\s*(?:/[^\s/,]+)+\.rs:\d+(?::\d+)?")


class SinkError(PipelineError):
    """The output table could not be opened or written."""

    def __init__(self, message: str) -> None:
        super().__init__(_BUILD_PATH.sub("", message))


class ScratchError(PipelineError):
    """A large object could not be spooled to the temporary folder (full, read-only): no file's
    fault, so the run fails and nothing is recorded against the file."""


class ClusterError(PipelineError):
    """The Ray cluster cannot do the run's work (workers keep dying, no node is left): no
    file's fault, so the run fails and nothing is recorded against a file."""


def first_pipeline_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Task groups wrap what their tasks raised: surface the pipeline's own error, once."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = first_pipeline_error(exc)
        if isinstance(exc, PipelineError):
            return exc
    first = group.exceptions[0]  # no error of ours: the first one, for the traceback
    return first_pipeline_error(first) if isinstance(first, BaseExceptionGroup) else first
