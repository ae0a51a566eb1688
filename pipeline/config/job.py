"""The job's ``validate``, ``sink`` and ``run`` sections, and :class:`JobConfig` (the ``source``
section is :mod:`pipeline.config.sources`'s, ``embed`` :mod:`pipeline.config.embed`'s).

Each key's docstring is its one-line description in ``docs/job-reference.md`` and the JSON
Schema (``embedpipe schema``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.config.embed import (
    BatchSettings,
    EmbedConfig,
    EmulatorEmbedConfig,
    EmulatorSettings,
    GeminiEmbedConfig,
    QuotaConfig,
    ReuseSource,
)
from pipeline.config.sources import (
    AzureOptions,
    S3Options,
    SourceConfig,
    _resolve_path,
    _Strict,
)
from pipeline.errors import ConfigError

__all__ = ["ArrowSinkConfig", "BatchSettings", "EmbedConfig", "EmulatorEmbedConfig",
           "EmulatorSettings", "GeminiEmbedConfig", "JobConfig", "LanceSinkConfig",
           "QuotaConfig", "ReuseSource", "RunConfig", "SinkConfig", "ValidateConfig"]

# --- validation -------------------------------------------------------------------------------


Policy = Literal["convert", "reject"]


class ValidateConfig(_Strict):
    """How files are fitted to the model's limits. ``None`` means: the model's own limit, or,
    for the ``*_convert_from`` lists, every format a decoder opens."""

    pdf_max_pages: int | None = Field(None, ge=1)
    """Pages per PDF part; a longer PDF is split (null: the model's limit, 6)."""
    audio_max_s: float | None = Field(None, gt=0)
    """Seconds per audio part (null: the model's limit, 180)."""
    video_max_s: float | None = Field(None, gt=0)
    """Seconds per video part (null: the model's limit, 120)."""
    too_long: Literal["split", "reject"] = "split"
    """Audio or video over the limit: cut into parts (split) or rejected as too_long."""
    image_policy: Policy = "convert"
    """An image in a format the model does not take: converted to PNG, or rejected."""
    audio_policy: Policy = "convert"
    """Audio in a format the model does not take: converted, or rejected."""
    video_policy: Policy = "convert"
    """Video in a format the model does not take: converted to MP4, or rejected."""
    audio_formats: list[str] = Field(default_factory=lambda: ["audio/mpeg", "audio/wav"])
    """The audio MIME types sent as they are; others are converted (or rejected)."""
    image_convert_from: list[str] | None = None
    """The image MIME types converted (null: every format a decoder opens)."""
    audio_convert_from: list[str] | None = None
    """The audio MIME types converted (null: every format a decoder opens)."""
    video_convert_from: list[str] | None = None
    """The video MIME types converted (null: every format a decoder opens)."""
    text_max_tokens: int | None = Field(None, ge=16)
    """Tokens per text chunk (null: the model's input limit)."""
    text_overlap_tokens: int = Field(64, ge=0)
    """Tokens each text chunk shares with the one before."""
    max_inline_bytes: int = Field(20_000_000, ge=1024)
    """The largest part sent inline, in bytes; larger ones are rejected as too_large."""
    max_image_pixels: int = Field(89_478_485, ge=1)
    """Images with more pixels are rejected (a decompression bomb guard)."""
    file_timeout_s: float = Field(120.0, gt=0)
    """Seconds a file's validation may take before it is rejected as timeout."""


# --- sink -------------------------------------------------------------------------------------


class LanceSinkConfig(_Strict):
    """A Lance database (a folder, or s3://bucket/path) holding the vectors table and the job's
    state (manifest, runs, batches) and rejects, kept per table: two tables in one sink folder
    never undo each other (for a table T they are T-files, T-runs ...)."""

    kind: Literal["lance"]
    """lance: a Lance database."""
    uri: str
    """The database: a folder, s3://bucket/path or az://container/path."""
    s3: S3Options | None = None
    """How to reach an s3:// uri (default: the source's, if it is on S3)."""
    azure: AzureOptions | None = None
    """How to reach an az:// uri (default: the source's, if it is on Azure)."""
    table: str = Field("vectors", pattern=r"^[A-Za-z0-9_\-.]+$")
    """The vectors table."""
    rejects_table: str = Field("rejects", pattern=r"^[A-Za-z0-9_\-.]+$")
    """The rejects table (default: rejects, or T-rejects for a table T)."""
    manifest_table: str = Field("files", pattern=r"^[A-Za-z0-9_\-.]+$")
    """The manifest of files seen (default: files, or T-files)."""
    runs_table: str = Field("runs", pattern=r"^[A-Za-z0-9_\-.]+$")
    """The run history (default: runs, or T-runs)."""
    batches_table: str = Field("batches", pattern=r"^[A-Za-z0-9_\-.]+$")
    """The Batch API jobs' log (default: batches, or T-batches)."""

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
    """arrow: Parquet or Arrow IPC files."""
    path: str
    """The local folder the files are written to."""
    format: Literal["parquet", "ipc"] = "parquet"
    """Parquet files, or Arrow IPC (.arrow) files."""
    table: Literal["vectors"] = "vectors"
    """The vectors' name (fixed)."""
    rejects_table: Literal["rejects"] = "rejects"
    """The rejects' name (fixed: <path>/_rejects)."""
    manifest_table: str = "files"
    """The manifest of files seen, in <path>/_state."""
    runs_table: str = "runs"
    """The run history, in <path>/_state."""
    batches_table: str = "batches"
    """The Batch API jobs' log, in <path>/_state."""
    s3: None = None
    """Not used: the arrow sink writes to a local folder."""
    azure: None = None
    """Not used: the arrow sink writes to a local folder."""

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
    """How a run goes: workers, flushes, deletions, the table's upkeep, the engine."""

    validate_workers: int = Field(4, ge=1, le=64)
    """Files validated at once (threads, or Ray tasks). Groups of small files from a local disk
    take turns (reading them is CPU work under the GIL); from a network share or an object
    store they are read in parallel."""
    queue_size: int = Field(256, ge=1)
    """Items held between stages (back-pressure)."""
    payload_memory_mb: int = Field(128, ge=1)
    """Megabytes of memory for payloads (PDF parts, images, media segments) between validation
    and the API, each counted at four times its size (its request's encodings): validation
    waits above it, and a file's time limit stops while it waits."""
    flush_rows: int = Field(2000, ge=1)
    """Rows committed to the table (or files to the manifest) at a time: what a killed run
    may redo."""
    flush_interval_s: float = Field(5.0, gt=0)
    """Seconds at most between commits."""
    on_delete: Literal["delete", "keep"] = "delete"
    """A file gone from the source: its rows deleted, or kept."""
    max_delete_fraction: float = Field(0.2, ge=0.0, le=1.0)
    """A run that would delete more than this share of the job's files (or all of them)
    deletes nothing and fails (exit 3); 1.0 or run --allow-mass-delete lets it."""
    report: str | None = "auto"
    """The run's JSON report: auto beside a local sink (reports/<run_id>.json), a path, or
    null for none."""
    compact: bool = False
    """Compact the table's files after each run (removing versions older than keep_days)."""
    keep_versions: int = Field(7, ge=1)
    """Run tags (run-<id>) kept on the table's versions: readers can go back to them."""
    keep_days: float = Field(7.0, gt=0)
    """No run tag or version older than this many days is kept."""
    index_min_rows: int | None = Field(None, ge=256)
    """A vector index is built once the table has this many rows (null: never)."""
    id_index_min_rows: int | None = Field(50_000, ge=1)
    """A BTREE index on id and content_key once the table is this large (null: never)."""
    index_type: Literal["IVF_PQ", "IVF_HNSW_SQ", "IVF_HNSW_PQ", "IVF_FLAT"] = "IVF_PQ"
    """The vector index's type."""
    engine: Literal["local", "ray", "auto"] = "local"
    """Where validation and the calls run: local (this process), ray (a Ray cluster), auto
    (ray when RAY_ADDRESS is set)."""
    ray_address: str | None = None
    """The Ray cluster to join (default: RAY_ADDRESS, else one started for the run)."""
    ray_connect_timeout_s: float = Field(30.0, gt=0)
    """Seconds to wait for the cluster's head before the run fails (exit 3)."""
    metrics_textfile: str | None = None
    """A .prom file the run's figures are written to (node_exporter's textfile collector)."""


class JobConfig(_Strict):
    """An embedpipe job file: where the files are, how they are embedded, where the vectors
    go."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-.]+$")
    """The job's name (letters, digits, _ - .)."""
    source: SourceConfig
    """Where the files are: a local folder, an S3 bucket, or a synthetic source."""
    embed: EmbedConfig
    """The model and the endpoint: Google's, a gateway, or the built-in emulator."""
    sink: SinkConfig
    """Where the vectors go: a Lance database, or Parquet/Arrow files."""
    validate_: ValidateConfig = Field(default_factory=lambda: ValidateConfig(), alias="validate")
    """How files are fitted to the model's limits."""
    run: RunConfig = Field(default_factory=lambda: RunConfig())
    """How a run goes."""

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


