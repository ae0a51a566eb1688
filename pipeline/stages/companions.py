"""Files that travel together: a media file and its caption sidecar (``photo.jpg`` +
``photo.txt``), and a metadata file (CSV or JSONL) that maps keys to a caption, a title and
typed columns.

The lister calls :meth:`Companions.attach` on each listed object: a sidecar is held back (it is
embedded with its media, not on its own); a media file gets its sidecar's key and a signature of
its companions (sidecar size and mtime, metadata row hash), so a change to either re-embeds it
while an unchanged pair still costs no read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

from connectors.base import Connector, content_version
from pipeline.config import MetadataConfig
from pipeline.errors import ConfigError, ConnectorError, ItemRejected, SourceUnavailable
from pipeline.records import Extras, SourceObject
from pipeline.validate.sniff import TEXT_MIMES, extension_mime
from pipeline.validate.text import decode_text

log = logging.getLogger("embedpipe.companions")


def load_metadata(cfg: MetadataConfig) -> dict[str, dict[str, Any]]:
    """key -> row. A malformed file is a configuration error naming the line."""
    rows: dict[str, dict[str, Any]] = {}
    try:
        with open(cfg.path, encoding="utf-8", newline="") as f:
            if cfg.path.suffix.lower() == ".csv":
                records: Any = enumerate(csv.DictReader(f), start=2)
            else:
                records = ((n, json.loads(line)) for n, line in enumerate(f, start=1)
                           if line.strip())
            for line, row in records:
                if not isinstance(row, dict) or cfg.key not in row:
                    raise ConfigError(f"{cfg.path}: line {line}: no '{cfg.key}' field")
                rows[str(row[cfg.key]).lstrip("/")] = row
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ConfigError(f"{cfg.path}: cannot read the metadata file: {exc}") from exc
    return rows


def _cast(value: Any, kind: str) -> Any:
    if value is None or value == "":
        return None
    if kind == "int64":
        return int(value)
    if kind == "float64":
        return float(value)
    if kind == "bool":
        return value if isinstance(value, bool) else str(value).strip().lower() in (
            "1", "true", "yes", "y")
    return str(value)


class Companions:
    def __init__(self, connector: Connector, sidecar: str | None,
                 metadata: MetadataConfig | None) -> None:
        self.connector = connector
        self.sidecar = sidecar
        self.metadata = metadata
        self.rows = load_metadata(metadata) if metadata else {}
        if sidecar is not None:
            head, _, tail = sidecar.partition("{stem}")
            self._prefix, self._suffix = head, tail

    @property
    def active(self) -> bool:
        return self.sidecar is not None or self.metadata is not None

    def _sidecar_stem(self, name: str) -> str | None:
        if (self.sidecar is not None and name.startswith(self._prefix)
                and name.endswith(self._suffix) and len(name) > len(self._prefix + self._suffix)):
            return name[len(self._prefix): len(name) - len(self._suffix)]
        return None

    def attach(self, obj: SourceObject) -> SourceObject | None:
        """The object with its companions noted, or None for a sidecar held back."""
        key = PurePosixPath(obj.key)
        folder = "" if str(key.parent) == "." else str(key.parent)
        parts: list[str] = []
        sidecar_key = None
        if self.sidecar is not None:
            names = self.connector.names_in(folder)
            stem = self._sidecar_stem(key.name)
            if stem is not None and any(
                    PurePosixPath(n).stem == stem and n != key.name
                    and self._sidecar_stem(n) is None for n in names):
                return None  # a caption: embedded with its media
            if extension_mime(key.name) not in TEXT_MIMES:
                name = self.sidecar.replace("{stem}", key.stem)
                if name in names:
                    sidecar_key = f"{folder}/{name}" if folder else name
                    side = self.connector.stat(sidecar_key)
                    if side is not None:
                        parts.append(f"sidecar:{side.size}:{side.mtime.timestamp():.6f}")
                    else:
                        sidecar_key = None
        row = self.rows.get(obj.key)
        if row is not None:
            blob = json.dumps(row, sort_keys=True, default=str).encode()
            parts.append("meta:" + hashlib.sha256(blob).hexdigest()[:16])
        if not parts:
            return obj
        return replace(obj, sidecar=sidecar_key, companions="|".join(parts))

    def read(self, obj: SourceObject, version: str) -> tuple[str, Extras | None]:
        """The combined version, and the caption, title and columns of ``obj``."""
        caption: str | None = None
        sidecar_uri = None
        if obj.sidecar is not None:
            side = self.connector.stat(obj.sidecar)
            if side is not None:
                try:
                    data = self.connector.read(side)
                    caption = decode_text(data).strip() or None
                    sidecar_uri = side.uri
                    version = f"{version}+{content_version(data)[7:23]}"
                except SourceUnavailable:
                    raise  # embedding the file without its caption would store a wrong vector
                except (ConnectorError, ItemRejected) as exc:  # a bad caption is not fatal
                    log.warning("%s: sidecar %s not used: %s", obj.key, obj.sidecar, exc)
        row = self.rows.get(obj.key)
        title = None
        columns: dict[str, object] | None = None
        if row is not None and self.metadata is not None:
            cfg = self.metadata
            if cfg.caption and row.get(cfg.caption):
                text = str(row[cfg.caption]).strip()
                caption = f"{caption}\n{text}" if caption else text
            if cfg.title and row.get(cfg.title):
                title = str(row[cfg.title])
            columns = {}
            for name, kind in cfg.columns.items():
                try:
                    columns[name] = _cast(row.get(name), kind)
                except (TypeError, ValueError):
                    log.warning("%s: metadata %s=%r is not %s; left empty", obj.key, name,
                                row.get(name), kind)
                    columns[name] = None
            version = f"{version}+{obj.companions.rsplit('meta:', 1)[-1][:16]}" if (
                obj.companions and "meta:" in obj.companions) else version
        if caption is None and title is None and columns is None:
            return version, None
        return version, Extras(caption, title, sidecar_uri, columns)

