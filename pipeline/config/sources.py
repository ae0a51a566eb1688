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
    # Whether it exists is asked when it is listed, not here: a missing root (an unmounted
    # share) is an outage (a run fails with exit 3), and status, search, report and rejects
    # must work during it.
    root: Path
    # Links to folders are not followed (each one is counted as skipped); true follows them,
    # wherever they lead, once each: a link back to a folder it is already in is skipped.
    follow_symlinks: bool = False

    @field_validator("root")
    @classmethod
    def _root(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve_path(value, info)


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


class SyntheticSourceConfig(_SourceCommon):
    """Generated objects for load tests (no files): ``count`` small texts with deterministic
    names (``obj/0000000000.txt``...), sizes and versions. At each ``generation`` after 0, a
    ``changed`` share of the objects, picked by a hash of ``seed``, gets a new version: running
    a job at generation g after one at g-1 finds about count x changed objects changed."""

    kind: Literal["synthetic"]
    count: int = Field(ge=0, le=10_000_000_000)
    generation: int = Field(0, ge=0, le=10_000)
    changed: float = Field(0.01, ge=0, le=1)
    words: int = Field(12, ge=1, le=2_000)
    seed: int = Field(0, ge=0, lt=2**32)

    @field_validator("sidecar", "metadata")
    @classmethod
    def _none(cls, value: object) -> None:
        if value is not None:
            raise ValueError("a synthetic source has no sidecars or metadata file")
        return None


SourceConfig = Annotated[LocalSourceConfig | S3SourceConfig | SyntheticSourceConfig,
                         Field(discriminator="kind")]


