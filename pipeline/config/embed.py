"""The job's ``embed`` section: the model, the endpoint (Google's, a gateway, or the built-in
emulator), how calls are packed, paced and retried, the Batch API, and content reuse.

Each key's docstring is its one-line description in ``docs/job-reference.md`` and the JSON
Schema (``embedpipe schema``)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from pipeline.config.sources import (
    GOOGLE_BASE_URL,
    AzureOptions,
    S3Options,
    _resolve_path,
    _Strict,
)
from pipeline.models import MAX_BATCH_REQUESTS, MAX_DIMENSIONS, MIN_DIMENSIONS, TASK_TYPES


class EmulatorSettings(_Strict):
    """The in-process emulator started for ``provider: emulator``: latency, quotas (counted the
    way Google counts them) and fault rates per call (0..1)."""

    api_key: SecretStr | None = None
    """A key the emulator requires (none: any request is served)."""
    latency_ms: float = Field(0.0, ge=0)
    """Milliseconds added to every call."""
    per_item_ms: float = Field(0.0, ge=0)
    """Milliseconds added per item of a batch call."""
    jitter_ms: float = Field(0.0, ge=0)
    """Random extra latency per call, up to this many milliseconds."""
    rpm: int | None = Field(None, ge=1)
    """Requests per minute it allows (each item counts); more are answered 429."""
    tpm: int | None = Field(None, ge=1)
    """Input tokens per minute it allows."""
    rpd: int | None = Field(None, ge=1)
    """Requests per day it allows (each item counts)."""
    window_s: float = Field(60.0, gt=0)
    """Length of the quota's 'minute' in seconds (shorter in tests)."""
    day_s: float = Field(86_400.0, gt=0)
    """Length of the quota's 'day' in seconds."""
    error_429: float = Field(0.0, ge=0, le=1)
    """Share of calls answered 429 RESOURCE_EXHAUSTED."""
    error_500: float = Field(0.0, ge=0, le=1)
    """Share of calls answered 500 INTERNAL."""
    error_503: float = Field(0.0, ge=0, le=1)
    """Share of calls answered 503 UNAVAILABLE."""
    reset: float = Field(0.0, ge=0, le=1)
    """Share of calls whose connection is reset."""
    stall: float = Field(0.0, ge=0, le=1)
    """Share of calls that hang for stall_s before answering."""
    stall_s: float = Field(30.0, gt=0)
    """How long a stalled call hangs, in seconds."""
    truncate: float = Field(0.0, ge=0, le=1)
    """Share of calls whose answer is cut short."""
    seed: int | None = None
    """Seed of the fault draws (none: a new one each start)."""
    batch_delay_s: float = Field(1.0, ge=0)
    """Batch API: seconds from a job's submission to its results."""
    batch_outcome: Literal["succeed", "fail", "expire"] = "succeed"
    """Batch API: how every job ends."""
    batch_error_rate: float = Field(0.0, ge=0, le=1)
    """Batch API: share of requests answered with a transient error."""
    max_batch_inline_bytes: int = Field(20_000_000, ge=1024)
    """Batch API: the largest inline job it accepts, in bytes."""
    max_file_bytes: int = Field(2_000_000_000, ge=1024)
    """Files API: the largest upload it accepts, in bytes."""
    upload_mb_per_s: float | None = Field(None, gt=0)
    """Files API: how fast uploads come in, in MB/s, as over a real link (none: as fast as
    the machine takes them)."""
    download_mb_per_s: float | None = Field(None, gt=0)
    """Files API: how fast downloads (a Batch API job's results) go out, in MB/s, as over a
    real link (none: as fast as the machine sends them)."""


class QuotaConfig(_Strict):
    """The project's quotas, when known: the run paces itself to stay under them. Unset
    budgets are unknown: the run then adapts to 429s (halving calls in flight, growing back)."""

    rpm: int | None = Field(None, ge=1)
    """Requests per minute; each item counts."""
    tpm: int | None = Field(None, ge=1)
    """Input tokens per minute."""
    rpd: int | None = Field(None, ge=1)
    """Requests per day; each item counts (a run stops with exit 4 when it is used up)."""

    @property
    def is_set(self) -> bool:
        """Whether any budget is known (else calls only adapt to 429s)."""
        return bool(self.rpm or self.tpm or self.rpd)


BatchModality = Literal["text", "image", "document", "audio", "video"]
BATCH_MODALITIES: tuple[BatchModality, ...] = ("text", "image", "document", "audio", "video")


class BatchSettings(_Strict):
    """Google's asynchronous Batch API: half the price, no per-minute quota, results within
    24 h. Limits are Google's documented ones; keep them configurable."""

    max_requests: int = Field(10_000, ge=1)
    """Requests per Batch API job."""
    max_file_bytes: int = Field(2_000_000_000, ge=1024)
    """The largest JSONL input file of a job, in bytes."""
    max_inline_bytes: int = Field(20_000_000, ge=1024)
    """A job this small (in bytes: its requests, and the answer its vectors make) is sent
    inline, with no file upload; a larger one's input is spooled to a temporary file and its
    results are streamed."""
    max_request_bytes: int = Field(20_000_000, ge=1024)
    """An item whose request is larger than this is embedded interactively."""
    modalities: list[BatchModality] = Field(default_factory=lambda: list(BATCH_MODALITIES))
    """The modalities sent to the Batch API; items of others are embedded interactively."""
    max_held_bytes: int = Field(512_000_000, ge=1)
    """Memory the items of submitted, unfinished jobs may hold, in bytes (their records, about
    2.4 kB an item, and their texts; media hold no payload once submitted). When it is reached,
    the run waits for a job to finish before it fills the next, so a backfill's memory stays
    bounded however long the Batch API takes; more means more jobs in flight."""
    max_downloads: int = Field(4, ge=1, le=64)
    """Finished jobs whose results are downloaded at once (each job's results are streamed and
    written a chunk at a time, so each download in flight holds a chunk of rows)."""
    poll_initial_s: float = Field(5.0, gt=0)
    """First wait between polls of a running job, in seconds (each wait after it is half as
    long again, up to poll_max_s)."""
    poll_max_s: float = Field(60.0, gt=0)
    """Longest wait between polls, in seconds."""
    fallback: Literal["interactive", "next_run"] = "interactive"
    """A job that ends FAILED, EXPIRED or CANCELLED: embed its items interactively in the same
    run where their payload is at hand, or leave them all to the next run."""


class ReuseSource(_Strict):
    """Another job's Lance table read as a cache of vectors by content key (``embed.reuse_from``):
    only rows made with the same model, dimensions and request can match. A plain string is
    its ``uri``."""

    uri: str
    """The table's folder, s3://bucket/path or az://container/path."""
    table: str = Field("vectors", pattern=r"^[A-Za-z0-9_\-.]+$")
    """The vectors table's name."""
    s3: S3Options | None = None
    """How to reach an s3:// uri (default: the job's sink's)."""
    azure: AzureOptions | None = None
    """How to reach an az:// uri (default: the job's sink's)."""

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, data: object) -> object:
        return {"uri": data} if isinstance(data, str) else data

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str, info: ValidationInfo) -> str:
        if "://" in value:
            return value
        return str(_resolve_path(Path(value), info))


class _EmbedCommon(_Strict):
    model: str = "gemini-embedding-2"
    """The embedding model (a model the endpoint serves)."""
    output_dimensionality: int = Field(768, ge=MIN_DIMENSIONS, le=MAX_DIMENSIONS)
    """The vectors' dimensions (Matryoshka truncation by the API)."""
    task_type: str | None = "RETRIEVAL_DOCUMENT"
    """The task the documents are embedded for (a Gemini task type, or null)."""
    query_task_type: str | None = "RETRIEVAL_QUERY"
    """The task `embedpipe search` embeds its queries for."""
    document_template: str | None = None
    """The text a document is sent as, with {title} and {content} (null: the model's default:
    prefixes for gemini-embedding-2, none for taskType models)."""
    query_template: str | None = None
    """The text a query is sent as, with {content} (null: the model's default)."""
    batch_size: int = Field(MAX_BATCH_REQUESTS, ge=1, le=MAX_BATCH_REQUESTS)
    """Requests per batchEmbedContents call."""
    max_batch_bytes: int = Field(8_000_000, ge=1024)
    """The largest request body of a call, in bytes."""
    max_batch_tokens: int = Field(200_000, ge=1)
    """The most input tokens (estimated) in one call."""
    concurrency: int = Field(32, ge=1, le=256)
    """Calls in flight (memory of media-heavy runs is about concurrency x max_batch_bytes)."""
    max_attempts: int = Field(6, ge=1, le=50)
    """Attempts per call on transient errors (5xx, resets, timeouts) before the run fails."""
    max_quota_wait_s: float = Field(600.0, gt=0)
    """Waiting on 429s costs no attempt; a call throttled this long in all stops the run
    (exit 4, everything done saved)."""
    backoff_base_s: float = Field(1.0, gt=0)
    """Backoff with full jitter when the server says nothing of when to retry: the n-th
    consecutive failure waits up to backoff_base_s x 2^(n-1)."""
    backoff_cap_s: float = Field(60.0, gt=0)
    """The longest backoff wait, in seconds."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds a call may take before it is abandoned and retried."""
    quota: QuotaConfig = Field(default_factory=lambda: QuotaConfig())
    """The project's quotas, when known: the run paces itself under them."""
    prices: dict[str, float] | None = None
    """USD per 1M input tokens by modality (text, image, document, audio, video); null: the
    model's list price."""
    mode: Literal["interactive", "batch", "auto"] = "auto"
    """interactive: batchEmbedContents calls; batch: the Batch API; auto: the Batch API once a
    run has more than batch_min_items items to embed (and the endpoint serves it)."""
    batch_min_items: int = Field(5000, ge=0)
    """The backlog from which mode auto uses the Batch API."""
    batch: BatchSettings = Field(default_factory=lambda: BatchSettings())
    """The Batch API's limits and polling."""
    title_from: Literal["name", "content"] = "name"
    """Where a document's title comes from: name: its own title, else its file name; content:
    only a title the file carries, so a renamed file sends the same request (and is reused)."""
    reuse: bool = True
    """Reuse vectors by content: an item whose request the table already holds is written
    with the stored vector and no call; items with one request in a run are sent once."""
    reuse_from: list[ReuseSource] = Field(default_factory=list)
    """Other jobs' tables read as caches of vectors by content key (folders, s3:// URIs, or
    {uri, table, s3})."""

    @field_validator("task_type", "query_task_type")
    @classmethod
    def _task_type(cls, value: str | None) -> str | None:
        if value is not None and value not in TASK_TYPES:
            hint = difflib.get_close_matches(value.upper(), TASK_TYPES, n=1, cutoff=0.5)
            raise ValueError(f"{value!r} is not a Gemini task type"
                             + (f" (did you mean '{hint[0]}'?)" if hint else "")
                             + f"; one of {', '.join(TASK_TYPES)}")
        return value

    def price_table(self) -> dict[str, float]:
        from pipeline.models import PRICES

        return self.prices if self.prices is not None else PRICES.get(self.model, {"text": 0.0})


class EmulatorEmbedConfig(_EmbedCommon):
    """The built-in Gemini-compatible emulator, started in-process for the run (offline)."""

    provider: Literal["emulator"]
    """emulator: no network, deterministic vectors."""
    emulator: EmulatorSettings = Field(default_factory=lambda: EmulatorSettings())
    """The emulator's latency, quotas and faults."""


class GeminiEmbedConfig(_EmbedCommon):
    """Google's Gemini API, or a gateway that speaks it."""

    provider: Literal["gemini"]
    """gemini: Google's endpoint or a gateway at base_url."""
    base_url: str = GOOGLE_BASE_URL
    """The endpoint: Google's, or a gateway's (http:// or https://)."""
    api_version: Literal["v1beta", "v1"] = "v1beta"
    """The API version in the path."""
    auth: Literal["google", "bearer", "raw"] = "google"
    """How the key is sent: x-goog-api-key (google), Authorization: Bearer (bearer), or a raw
    Authorization header (raw)."""
    api_key: SecretStr | None = None
    """The key, e.g. ${GEMINI_API_KEY} (never written to logs, reports or tables)."""
    batch_api: Literal["auto", "yes", "no"] = "auto"
    """Whether the endpoint serves the Batch API: auto: yes on Google's host, elsewhere asked
    once with a cheap probe and remembered per base URL."""

    @field_validator("batch_api", mode="before")
    @classmethod
    def _yes_no(cls, value: object) -> object:
        """YAML reads a bare yes / no as true / false."""
        return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"base_url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")


EmbedConfig = Annotated[EmulatorEmbedConfig | GeminiEmbedConfig, Field(discriminator="provider")]
