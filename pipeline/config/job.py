"""The job's ``embed``, ``validate``, ``sink`` and ``run`` sections, and :class:`JobConfig`."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.config.sources import (
    GOOGLE_BASE_URL,
    S3Options,
    SourceConfig,
    _resolve_path,
    _Strict,
)
from pipeline.errors import ConfigError
from pipeline.models import MAX_BATCH_REQUESTS, MAX_DIMENSIONS, MIN_DIMENSIONS, TASK_TYPES

# --- embedder ---------------------------------------------------------------------------------


class EmulatorSettings(_Strict):
    """The in-process emulator started for ``provider: emulator``: latency, quotas (counted the
    way Google counts them) and fault rates per call (0..1)."""

    api_key: SecretStr | None = None
    latency_ms: float = Field(0.0, ge=0)
    per_item_ms: float = Field(0.0, ge=0)
    jitter_ms: float = Field(0.0, ge=0)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    rpd: int | None = Field(None, ge=1)
    window_s: float = Field(60.0, gt=0)
    day_s: float = Field(86_400.0, gt=0)
    error_429: float = Field(0.0, ge=0, le=1)
    error_500: float = Field(0.0, ge=0, le=1)
    error_503: float = Field(0.0, ge=0, le=1)
    reset: float = Field(0.0, ge=0, le=1)
    stall: float = Field(0.0, ge=0, le=1)
    stall_s: float = Field(30.0, gt=0)
    truncate: float = Field(0.0, ge=0, le=1)
    seed: int | None = None
    # The Batch API (asyncBatchEmbedContent) and Files API.
    batch_delay_s: float = Field(1.0, ge=0)
    batch_outcome: Literal["succeed", "fail", "expire"] = "succeed"
    batch_error_rate: float = Field(0.0, ge=0, le=1)
    max_batch_inline_bytes: int = Field(20_000_000, ge=1024)
    max_file_bytes: int = Field(2_000_000_000, ge=1024)


class QuotaConfig(_Strict):
    """The project's quotas, when known: the run paces itself to stay under them. Unset
    budgets are unknown: the run then adapts to 429s (halving calls in flight, growing back)."""

    rpm: int | None = Field(None, ge=1, description="requests per minute; each item counts")
    tpm: int | None = Field(None, ge=1, description="input tokens per minute")
    rpd: int | None = Field(None, ge=1, description="requests per day; each item counts")

    @property
    def is_set(self) -> bool:
        """Whether any budget is known (else calls only adapt to 429s)."""
        return bool(self.rpm or self.tpm or self.rpd)


BatchModality = Literal["text", "image", "document", "audio", "video"]
BATCH_MODALITIES: tuple[BatchModality, ...] = ("text", "image", "document", "audio", "video")


class BatchSettings(_Strict):
    """Google's asynchronous Batch API: half the price, no per-minute quota, results within
    24 h. Limits are Google's documented ones; keep them configurable."""

    max_requests: int = Field(10_000, ge=1)  # per job
    max_file_bytes: int = Field(2_000_000_000, ge=1024)  # a job's JSONL input file
    max_inline_bytes: int = Field(20_000_000, ge=1024)  # a job this small goes inline
    # An item whose request is larger, or of a modality not listed, is embedded interactively.
    max_request_bytes: int = Field(20_000_000, ge=1024)
    modalities: list[BatchModality] = Field(default_factory=lambda: list(BATCH_MODALITIES))
    poll_initial_s: float = Field(5.0, gt=0)
    poll_max_s: float = Field(60.0, gt=0)
    # A job that ends FAILED, EXPIRED or CANCELLED (or is gone): its items are embedded
    # interactively in the same run where their payload is at hand (texts; media bytes went
    # into the job and are read again by the next run), or all left to the next run.
    fallback: Literal["interactive", "next_run"] = "interactive"


class ReuseSource(_Strict):
    """Another job's Lance table read as a cache of vectors by content key (``embed.reuse_from``):
    only rows made with the same model, dimensions and request can match."""

    uri: str  # a folder, or s3://bucket/path
    table: str = Field("vectors", pattern=r"^[A-Za-z0-9_\-.]+$")
    s3: S3Options | None = None  # for an s3:// uri; default: the job's sink's

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
    output_dimensionality: int = Field(768, ge=MIN_DIMENSIONS, le=MAX_DIMENSIONS)
    task_type: str | None = "RETRIEVAL_DOCUMENT"
    query_task_type: str | None = "RETRIEVAL_QUERY"
    # None: the model's default (prefixes for gemini-embedding-2, none for taskType models).
    document_template: str | None = None
    query_template: str | None = None
    batch_size: int = Field(MAX_BATCH_REQUESTS, ge=1, le=MAX_BATCH_REQUESTS)
    max_batch_bytes: int = Field(8_000_000, ge=1024)
    max_batch_tokens: int = Field(200_000, ge=1)
    # Calls in flight. Memory for media-heavy runs is about concurrency x max_batch_bytes.
    concurrency: int = Field(32, ge=1, le=256)
    max_attempts: int = Field(6, ge=1, le=50)
    # Waiting on 429s costs no attempt; a call throttled for this long in all stops the run
    # (exit 4, everything done saved).
    max_quota_wait_s: float = Field(600.0, gt=0)
    # Backoff with full jitter when the server says nothing of when to retry: the n-th
    # consecutive failure waits up to backoff_base_s * 2^(n-1), at most backoff_cap_s.
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_cap_s: float = Field(60.0, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    quota: QuotaConfig = Field(default_factory=lambda: QuotaConfig())
    # USD per 1M input tokens by modality (text, image, document, audio, video);
    # default: the model's list price (pipeline/models.py, PRICES and its SOURCES).
    prices: dict[str, float] | None = None
    # interactive: batchEmbedContents calls; batch: the Batch API; auto: the Batch API once a
    # run has more than batch_min_items items to embed (a backfill), else interactive.
    mode: Literal["interactive", "batch", "auto"] = "auto"
    batch_min_items: int = Field(5000, ge=0)
    batch: BatchSettings = Field(default_factory=lambda: BatchSettings())
    # Where a document's title (RETRIEVAL_DOCUMENT's title, a template's {title}) comes from:
    # "name": the file's own title, else its file name; "content": only a title the file or
    # its companions carry ("none" otherwise), so a renamed text file sends the same request
    # and reuses its vector instead of being paid again.
    title_from: Literal["name", "content"] = "name"
    # Content, not paths, is paid for: an item whose request (its content key) the job's
    # table already holds is written with the stored vector and no call, and items with one
    # key in a run are sent once. reuse_from: other jobs' tables read the same way.
    reuse: bool = True
    reuse_from: list[ReuseSource] = Field(default_factory=list)

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
    provider: Literal["emulator"]
    emulator: EmulatorSettings = Field(default_factory=lambda: EmulatorSettings())


class GeminiEmbedConfig(_EmbedCommon):
    provider: Literal["gemini"]
    base_url: str = GOOGLE_BASE_URL
    api_version: Literal["v1beta", "v1"] = "v1beta"
    auth: Literal["google", "bearer", "raw"] = "google"
    api_key: SecretStr | None = None
    # Whether the endpoint serves the Batch API (asyncBatchEmbedContent, batches, files):
    # auto: yes on Google's own host; elsewhere (a gateway) asked once with a cheap probe
    # and remembered per base URL in the job's state. Gateways built on new-api / one-api
    # serve only the interactive methods: mode auto then embeds interactively.
    batch_api: Literal["auto", "yes", "no"] = "auto"

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


# --- validation -------------------------------------------------------------------------------


Policy = Literal["convert", "reject"]


class ValidateConfig(_Strict):
    """How files are fitted to the model's limits. ``None`` means: the model's own limit, or,
    for the ``*_convert_from`` lists, every format a decoder opens."""

    pdf_max_pages: int | None = Field(None, ge=1)
    audio_max_s: float | None = Field(None, gt=0)
    video_max_s: float | None = Field(None, gt=0)
    too_long: Literal["split", "reject"] = "split"
    image_policy: Policy = "convert"
    audio_policy: Policy = "convert"
    video_policy: Policy = "convert"
    audio_formats: list[str] = Field(default_factory=lambda: ["audio/mpeg", "audio/wav"])
    image_convert_from: list[str] | None = None
    audio_convert_from: list[str] | None = None
    video_convert_from: list[str] | None = None
    text_max_tokens: int | None = Field(None, ge=16)
    text_overlap_tokens: int = Field(64, ge=0)
    max_inline_bytes: int = Field(20_000_000, ge=1024)
    max_image_pixels: int = Field(89_478_485, ge=1)
    file_timeout_s: float = Field(120.0, gt=0)


# --- sink -------------------------------------------------------------------------------------


class LanceSinkConfig(_Strict):
    kind: Literal["lance"]
    uri: str  # a folder, or s3://bucket/path
    s3: S3Options | None = None  # for an s3:// uri; default: the source's, if it is on S3
    # The job's state (manifest, runs, batches) and rejects are kept per table: two tables (or
    # two jobs writing their own table) in one sink folder never undo each other. For the
    # default table they are files, runs, batches, rejects; for a table T, T-files, T-runs ...
    table: str = Field("vectors", pattern=r"^[A-Za-z0-9_\-.]+$")
    rejects_table: str = Field("rejects", pattern=r"^[A-Za-z0-9_\-.]+$")
    manifest_table: str = Field("files", pattern=r"^[A-Za-z0-9_\-.]+$")
    runs_table: str = Field("runs", pattern=r"^[A-Za-z0-9_\-.]+$")
    batches_table: str = Field("batches", pattern=r"^[A-Za-z0-9_\-.]+$")

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str, info: ValidationInfo) -> str:
        if "://" in value:
            return value
        return str(_resolve_path(Path(value), info))

    @model_validator(mode="before")
    @classmethod
    def _state_per_table(cls, data: object) -> object:
        """The state tables' default names follow the vectors table's."""
        if isinstance(data, dict) and data.get("table") not in (None, "vectors"):
            table = data["table"]
            for key, base in (("rejects_table", "rejects"), ("manifest_table", "files"),
                              ("runs_table", "runs"), ("batches_table", "batches")):
                data = {**data, key: data.get(key) or f"{table}-{base}"}
        return data


    @property
    def state_uri(self) -> str:
        """Where the manifest and run history live: the same Lance database."""
        return self.uri


class ArrowSinkConfig(_Strict):
    """Parquet or Arrow IPC files that pyarrow, polars and duckdb read with no glue:
    ``<path>/*.parquet`` (``.arrow`` for IPC), the rejects beside them in ``<path>/_rejects``;
    the manifest and run history live in a Lance database at ``<path>/_state``."""

    kind: Literal["arrow"]
    path: str
    format: Literal["parquet", "ipc"] = "parquet"
    table: Literal["vectors"] = "vectors"
    rejects_table: Literal["rejects"] = "rejects"
    manifest_table: str = "files"
    runs_table: str = "runs"
    batches_table: str = "batches"
    s3: None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str, info: ValidationInfo) -> str:
        if "://" in value:
            raise ValueError("the arrow sink writes to a local folder; use kind: lance for s3://")
        return str(_resolve_path(Path(value), info))

    @property
    def uri(self) -> str:
        return self.path

    @property
    def state_uri(self) -> str:
        return str(Path(self.path) / "_state")


SinkConfig = Annotated[LanceSinkConfig | ArrowSinkConfig, Field(discriminator="kind")]


class RunConfig(_Strict):
    validate_workers: int = Field(4, ge=1, le=64)
    queue_size: int = Field(256, ge=1)
    flush_rows: int = Field(2000, ge=1)
    flush_interval_s: float = Field(5.0, gt=0)
    on_delete: Literal["delete", "keep"] = "delete"
    # A run that would delete more than this share of the files the job knew (or all of
    # them) deletes nothing and fails (exit 3): an emptied source is not a night's changes.
    # 1.0 (or `run --allow-mass-delete`) lets such a run delete.
    max_delete_fraction: float = Field(0.2, ge=0.0, le=1.0)
    # The run's JSON report: "auto" writes it beside a local sink (reports/<run_id>.json),
    # a path writes it there, null writes none.
    report: str | None = "auto"
    compact: bool = False
    # Each run tags its table version (run-<id>); Lance keeps every file a tagged version
    # needs. The newest keep_versions run tags are kept, and none older than keep_days;
    # compaction (run.compact) removes versions older than keep_days. Disk use grows with both.
    keep_versions: int = Field(7, ge=1)
    keep_days: float = Field(7.0, gt=0)
    index_min_rows: int | None = Field(None, ge=256)
    # A BTREE index on the rows' id once the table is this large: merging a flush on id scans
    # every id without one (null: never).
    id_index_min_rows: int | None = Field(50_000, ge=1)
    index_type: Literal["IVF_PQ", "IVF_HNSW_SQ", "IVF_HNSW_PQ", "IVF_FLAT"] = "IVF_PQ"
    # Where validation and the embedding calls run: "local" (this process), "ray" (a Ray
    # cluster: ray_address, else RAY_ADDRESS, else one started on this machine for the run),
    # "auto" (ray when RAY_ADDRESS is set). Listing and writing stay in this process.
    engine: Literal["local", "ray", "auto"] = "local"
    ray_address: str | None = None
    # How long to wait for the cluster's head to answer before the run fails (exit 3).
    ray_connect_timeout_s: float = Field(30.0, gt=0)
    # The run's figures in Prometheus text format, written atomically at the end of each run
    # (for node_exporter's textfile collector: a path ending in .prom in its folder).
    metrics_textfile: str | None = None


class JobConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-.]+$")
    source: SourceConfig
    embed: EmbedConfig
    sink: SinkConfig
    validate_: ValidateConfig = Field(default_factory=lambda: ValidateConfig(), alias="validate")
    run: RunConfig = Field(default_factory=lambda: RunConfig())

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    # The ${VAR} of embed.api_key when it was not set: only commands that call the API need it.
    _unset_key_variable: str | None = PrivateAttr(None)
    _path: str | None = PrivateAttr(None)  # the job file, for messages

    def require_api_key(self) -> None:
        """For commands that call the API (run, search): ``provider: gemini`` needs a key."""
        embed = self.embed
        if not isinstance(embed, GeminiEmbedConfig):
            return
        if embed.api_key is None or not embed.api_key.get_secret_value().strip():
            why = (f"environment variable {self._unset_key_variable} is not set"
                   if self._unset_key_variable else "no key is given (or it is empty)")
            raise ConfigError(f"{self._path or 'job ' + self.name}: embed.api_key: {why}; "
                              "provider gemini needs an API key to call the API, e.g. "
                              "api_key: ${GEMINI_API_KEY}")

    def fingerprint(self) -> str:
        """What makes two embeddings of the same file comparable: change it and files re-embed."""
        parts = {
            "model": self.embed.model,
            "dims": self.embed.output_dimensionality,
            "task": self.embed.task_type,
            "template": self.embed.document_template,
            # not there when it is the default: tables made before it existed keep theirs
            **({"title_from": self.embed.title_from} if self.embed.title_from != "name" else {}),
            "validate": self.validate_.model_dump(
                include={"pdf_max_pages", "text_max_tokens", "text_overlap_tokens", "audio_max_s",
                         "video_max_s", "audio_formats"}
            ),
        }
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


