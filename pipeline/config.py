"""Job files: YAML -> typed, frozen pydantic models.

- Unknown keys are errors (with a "did you mean" hint), never ignored.
- ``${VAR}`` and ``${VAR:-default}`` in any string are taken from the environment; ``$$`` is a
  literal ``$``. An unset variable without a default is an error naming the key.
- Relative paths resolve against the folder of the YAML file, not the working directory.
- The API key is a ``SecretStr``: it prints as ``**********`` everywhere.

:func:`load_job` is the only entry point; every failure becomes one :class:`ConfigError` whose
text names the file, the key path and the problem.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from pipeline.errors import ConfigError
from pipeline.models import MAX_BATCH_REQUESTS, MAX_DIMENSIONS, MIN_DIMENSIONS, TASK_TYPES

GOOGLE_BASE_URL = "https://generativelanguage.googleapis.com"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return Path(os.path.normpath(value))


# --- source -----------------------------------------------------------------------------------


ColumnType = Literal["string", "int64", "float64", "bool"]
RESERVED_COLUMNS = frozenset({
    "id", "uri", "key", "version", "part", "part_count", "modality", "mime", "source_mime",
    "claimed_mime", "sidecar_uri", "page_start", "page_end", "char_start", "char_end",
    "time_start_s", "time_end_s", "text", "model", "dims", "vector", "tokens", "run_id",
    "embedded_at"})


class MetadataConfig(_Strict):
    """A CSV or JSONL file mapping source keys to fields: a caption embedded with the file,
    a title, and typed columns written beside each vector (filterable in searches)."""

    path: Path
    key: str = "path"
    caption: str | None = None
    title: str | None = None
    columns: dict[str, ColumnType] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _path(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve_path(value, info)
        if not path.is_file():
            raise ValueError(f"metadata file {path} does not exist")
        if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
            raise ValueError("metadata file must be .csv or .jsonl")
        return path

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"column name {name!r} must be a plain identifier")
            if name in RESERVED_COLUMNS:
                raise ValueError(f"column name {name!r} is one of the table's own columns")
        return value


class _SourceCommon(_Strict):
    include: list[str] = Field(default_factory=lambda: ["**/*"], min_length=1)
    exclude: list[str] = Field(default_factory=list)
    sidecar: str | None = None  # e.g. "{stem}.txt": a caption file embedded with its media
    metadata: MetadataConfig | None = None

    @field_validator("sidecar")
    @classmethod
    def _sidecar(cls, value: str | None) -> str | None:
        if value is not None and ("{stem}" not in value or "/" in value):
            raise ValueError("sidecar must name a file beside the media and contain {stem}, "
                             "e.g. '{stem}.txt'")
        return value


class LocalSourceConfig(_SourceCommon):
    kind: Literal["local"]
    root: Path

    @field_validator("root")
    @classmethod
    def _root(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve_path(value, info)
        if not path.is_dir():
            raise ValueError(f"folder {path} does not exist")
        return path


class S3Options(_Strict):
    """Where and how to reach an S3-compatible store. Unset values come from the standard
    environment variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN); keys are secrets."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    allow_http: bool | None = None  # default: true when endpoint_url is http://
    virtual_hosted_style: bool = False
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0, le=50)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"endpoint_url must start with http:// or https://, got {value!r}")
        return value.rstrip("/") if value else value


class S3SourceConfig(_SourceCommon, S3Options):
    kind: Literal["s3"]
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-_]{1,254}$")
    prefix: str = ""

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        return f"{value}/" if value else ""


SourceConfig = Annotated[LocalSourceConfig | S3SourceConfig, Field(discriminator="kind")]


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


class QuotaConfig(_Strict):
    """The project's quotas, when known: the run paces itself to stay under them. Unset
    budgets are unknown: the run then adapts to 429s (halving calls in flight, growing back)."""

    rpm: int | None = Field(None, ge=1, description="requests per minute; each item counts")
    tpm: int | None = Field(None, ge=1, description="input tokens per minute")
    rpd: int | None = Field(None, ge=1, description="requests per day; each item counts")


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
    timeout_s: float = Field(120.0, gt=0)
    quota: QuotaConfig = Field(default_factory=lambda: QuotaConfig())
    # USD per 1M input tokens by modality (text, image, document, audio, video);
    # default: the model's list price from ../shared/GEMINI_API.md.
    prices: dict[str, float] | None = None

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
    table: str = Field("vectors", pattern=r"^[A-Za-z0-9_\-.]+$")
    rejects_table: str = Field("rejects", pattern=r"^[A-Za-z0-9_\-.]+$")
    manifest_table: str = Field("files", pattern=r"^[A-Za-z0-9_\-.]+$")
    runs_table: str = Field("runs", pattern=r"^[A-Za-z0-9_\-.]+$")

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str, info: ValidationInfo) -> str:
        if "://" in value:
            return value
        return str(_resolve_path(Path(value), info))


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
    index_min_rows: int | None = Field(None, ge=256)
    # A BTREE index on the rows' id once the table is this large: merging a flush on id scans
    # every id without one (null: never).
    id_index_min_rows: int | None = Field(50_000, ge=1)
    index_type: Literal["IVF_PQ", "IVF_HNSW_SQ", "IVF_HNSW_PQ", "IVF_FLAT"] = "IVF_PQ"


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
            "validate": self.validate_.model_dump(
                include={"pdf_max_pages", "text_max_tokens", "text_overlap_tokens", "audio_max_s",
                         "video_max_s", "audio_formats"}
            ),
        }
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --- loading ----------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# Keys whose unset ${VAR} is not an error at load: commands that never call the API (plan,
# status) run without the key; those that do check it (JobConfig.require_api_key).
_DEFERRED = {("embed", "api_key")}


def _expand(value: Any, path: tuple[str | int, ...], env: dict[str, str],
            unset: list[str] | None = None) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, (*path, str(k)), env, unset) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*path, i), env, unset) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        if path in _DEFERRED and unset is not None:
            unset.append(name)
            return ""
        raise _UnsetVariable(path, name)

    return _VAR.sub(sub, value)


class _UnsetVariable(Exception):
    def __init__(self, path: tuple[str | int, ...], name: str) -> None:
        self.path = path
        self.name = name


def _loc(parts: tuple[str | int, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


_TAGGED = {"source": "kind", "embed": "provider", "sink": "kind"}


def _clean_loc(loc: tuple[str | int, ...], raw: Any) -> tuple[str | int, ...]:
    """Drop the union tag pydantic puts into locations (``source.local.root`` -> ``source.root``)."""
    if len(loc) >= 2 and loc[0] in _TAGGED and isinstance(raw, dict):
        section = raw.get(str(loc[0]))
        if isinstance(section, dict) and section.get(_TAGGED[str(loc[0])]) == loc[1]:
            return (loc[0], *loc[2:])
    if loc and loc[0] == "validate_":
        return ("validate", *loc[1:])
    return loc


def _model_at(loc: tuple[str | int, ...], raw: Any) -> type[BaseModel] | None:
    """The model class that owns the key at ``loc`` (for "did you mean" hints)."""
    model: type[BaseModel] = JobConfig
    node = raw
    for key in loc[:-1]:
        field = next(
            (f for n, f in model.model_fields.items() if key in (n, f.alias)), None
        )
        if field is None or not isinstance(node, dict):
            return None
        node = node.get(str(key))
        candidates = _model_members(field.annotation)
        if len(candidates) > 1 and isinstance(node, dict):
            tag = _TAGGED.get(str(key), "kind")
            candidates = [
                c for c in candidates
                if node.get(tag) in getattr(c.model_fields[tag].annotation, "__args__", ())
            ] or candidates
        if not candidates:
            return None
        model = candidates[0]
    return model


def _model_members(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    members: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()):
        members.extend(_model_members(arg))
    return members


def _describe(err: Any, raw: Any) -> str:
    loc = _clean_loc(tuple(err["loc"]), raw)
    if err["type"] == "extra_forbidden":
        model = _model_at(loc, raw)
        known = [f.alias or n for n, f in model.model_fields.items()] if model else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})"
        return f"{_loc(loc)}: unknown key{extra if known else ''}"
    if err["type"] == "missing":
        return f"{_loc(loc)}: required key is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "union_tag_invalid":
        return f"{_loc(loc)}: {msg}"
    return f"{_loc(loc)}: {msg}"


def load_job(path: str | Path, env: dict[str, str] | None = None) -> JobConfig:
    """Load and validate a job file. Raises :class:`ConfigError` with a one-line-per-problem text."""
    path = Path(path)
    env = dict(os.environ) if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: job file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job file must be a mapping of keys, got {type(raw).__name__}")
    unset: list[str] = []
    try:
        data = _expand(raw, (), env, unset)
    except _UnsetVariable as exc:
        raise ConfigError(
            f"{path}: {_loc(exc.path)}: environment variable {exc.name} is not set "
            f"(set it, or write ${{{exc.name}:-default}})"
        ) from None
    try:
        job = JobConfig.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        problems = [_describe(e, raw) for e in exc.errors(include_input=False)]
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems)) from None
    job._unset_key_variable = unset[0] if unset else None
    job._path = str(path)
    return job
