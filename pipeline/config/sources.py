"""The job's ``source`` section: a local folder or an S3-compatible bucket, with the sidecar
captions and metadata file that travel with its files. Also the base every section derives from
(unknown keys are errors; values are frozen) and relative paths resolved against the job file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)

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
    """The CSV or JSONL file."""
    key: str = "path"
    """The field holding a file's key (its path under the source's root or prefix)."""
    caption: str | None = None
    """The field embedded with the file as its caption."""
    title: str | None = None
    """The field sent as the document's title."""
    columns: dict[str, ColumnType] = Field(default_factory=dict)
    """Fields written beside each vector, by name: string, int64, float64 or bool."""

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
    """Glob patterns of the keys listed."""
    exclude: list[str] = Field(default_factory=list)
    """Glob patterns of keys left out."""
    sidecar: str | None = None
    """A caption file beside each media file, embedded with it, e.g. "{stem}.txt"."""
    metadata: MetadataConfig | None = None
    """A CSV or JSONL file of captions, titles and columns by key."""

    @field_validator("sidecar")
    @classmethod
    def _sidecar(cls, value: str | None) -> str | None:
        if value is not None and ("{stem}" not in value or "/" in value):
            raise ValueError("sidecar must name a file beside the media and contain {stem}, "
                             "e.g. '{stem}.txt'")
        return value


class LocalSourceConfig(_SourceCommon):
    """A folder on this machine: every file under it that the include and exclude globs
    keep."""

    kind: Literal["local"]
    """local: a folder on this machine (or a mounted share)."""
    # Whether it exists is asked when it is listed, not here: a missing root (an unmounted
    # share) is an outage (a run fails with exit 3), and status, search, report and rejects
    # must work during it.
    root: Path
    """The folder (relative to the job file, or absolute)."""
    follow_symlinks: bool = False
    """Follow links to folders, wherever they lead, once each (else each is counted as
    skipped)."""

    @field_validator("root")
    @classmethod
    def _root(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve_path(value, info)


def _http_endpoint(value: str | None) -> str | None:
    """An object store's endpoint_url: http(s), without a trailing slash."""
    if value is not None and not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"endpoint_url must start with http:// or https://, got {value!r}")
    return value.rstrip("/") if value else value


class S3Options(_Strict):
    """Where and how to reach an S3-compatible store. Unset values come from the standard
    environment variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN); keys are secrets."""

    endpoint_url: str | None = None
    """The store's endpoint (default: AWS_ENDPOINT_URL, else AWS S3)."""
    region: str | None = None
    """The region (default: AWS_REGION)."""
    access_key_id: SecretStr | None = None
    """The access key id (default: AWS_ACCESS_KEY_ID)."""
    secret_access_key: SecretStr | None = None
    """The secret key (default: AWS_SECRET_ACCESS_KEY)."""
    session_token: SecretStr | None = None
    """A session token (default: AWS_SESSION_TOKEN)."""
    allow_http: bool | None = None
    """Allow plain http (default: true when endpoint_url is http://)."""
    virtual_hosted_style: bool = False
    """bucket.host URLs instead of host/bucket paths."""
    timeout_s: float = Field(60.0, gt=0)
    """Seconds a request to the store may take."""
    max_retries: int = Field(6, ge=0, le=50)
    """Retries of a failed request to the store."""

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _http_endpoint(value)


class S3SourceConfig(_SourceCommon, S3Options):
    """An S3-compatible bucket (AWS S3, MinIO, SeaweedFS, R2 ...): the objects under a prefix,
    each with its ETag as its version."""

    kind: Literal["s3"]
    """s3: an S3-compatible bucket."""
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-_]{1,254}$")
    """The bucket."""
    prefix: str = ""
    """The prefix listed (a folder in the bucket)."""

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        return f"{value}/" if value else ""


class AzureOptions(_Strict):
    """Where and how to reach Azure Blob Storage (or Azurite). Unset values come from the
    standard environment variables (AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_NAME,
    AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN, and AZURE_CLIENT_ID, AZURE_CLIENT_SECRET,
    AZURE_TENANT_ID for a service principal); keys are secrets."""

    account_name: str | None = None
    """The storage account (default: AZURE_STORAGE_ACCOUNT_NAME, or the connection string's)."""
    account_key: SecretStr | None = None
    """The account key (default: AZURE_STORAGE_ACCOUNT_KEY, or the connection string's)."""
    sas_token: SecretStr | None = None
    """A shared access signature instead of the key (default: AZURE_STORAGE_SAS_TOKEN)."""
    connection_string: SecretStr | None = None
    """A connection string holding the account, its key or SAS and its endpoint (default:
    AZURE_STORAGE_CONNECTION_STRING)."""
    endpoint_url: str | None = None
    """The blob endpoint, for Azurite or a private endpoint, e.g.
    http://127.0.0.1:10000/devstoreaccount1 (default: the account's public one)."""
    allow_http: bool | None = None
    """Allow plain http (default: true when endpoint_url is http://)."""
    timeout_s: float = Field(60.0, gt=0)
    """Seconds a request to the store may take."""
    max_retries: int = Field(6, ge=0, le=50)
    """Retries of a failed request to the store."""

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _http_endpoint(value)


class AzureSourceConfig(_SourceCommon, AzureOptions):
    """An Azure Blob Storage container: the blobs under a prefix, each with its ETag as its
    version."""

    kind: Literal["azure"]
    """azure: an Azure Blob Storage container (az:// URIs)."""
    container: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
    """The container (3 to 63 lowercase letters, digits and hyphens)."""
    prefix: str = ""
    """The prefix listed (a folder in the container)."""

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        return f"{value}/" if value else ""


class SyntheticSourceConfig(_SourceCommon):
    """Generated objects for load tests (no files): ``count`` small texts with deterministic
    names (``obj/0000000000.txt``...), sizes and versions. At each ``generation`` after 0, a
    ``changed`` share of the objects, picked by a hash of ``seed``, gets a new version: running
    a job at generation g after one at g-1 finds about count x changed objects changed."""

    kind: Literal["synthetic"]
    """synthetic: generated objects for load tests."""
    count: int = Field(ge=0, le=10_000_000_000)
    """How many objects."""
    generation: int = Field(0, ge=0, le=10_000)
    """The generation listed: each one after 0 changes a share of the objects."""
    changed: float = Field(0.01, ge=0, le=1)
    """The share of objects a generation changes."""
    words: int = Field(12, ge=1, le=2_000)
    """Words per generated text."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seed of which objects change."""

    @field_validator("sidecar", "metadata")
    @classmethod
    def _none(cls, value: object) -> None:
        if value is not None:
            raise ValueError("a synthetic source has no sidecars or metadata file")
        return None


SourceConfig = Annotated[LocalSourceConfig | S3SourceConfig | AzureSourceConfig
                         | SyntheticSourceConfig,
                         Field(discriminator="kind")]


