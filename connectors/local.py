"""Local disk: a recursive, sorted, lazy walk under a root folder.

Symbolic links to files are followed only while they stay inside the root; a link that leads out
of it (or is broken) is listed as a reject so the user sees it. Links to folders are not followed,
which also rules out cycles.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote_from_bytes

from connectors.base import key_selected
from pipeline.config import LocalSourceConfig
from pipeline.errors import ConnectorError, RejectReason
from pipeline.records import Reject, SourceObject


def file_uri(path: str) -> str:
    """``Path(path).as_uri()`` for an absolute path, without building a Path."""
    return "file://" + quote_from_bytes(os.fsencode(path))


class LocalConnector:
    def __init__(self, config: LocalSourceConfig) -> None:
        self.root = config.root.resolve()
        self._root = str(self.root)
        self.include = config.include
        self.exclude = config.exclude

    def list(self) -> Iterator[SourceObject | Reject]:
        yield from self._walk(self.root, "")

    def _walk(self, folder: Path, prefix: str) -> Iterator[SourceObject | Reject]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield self._reject(folder, prefix.rstrip("/") or ".", f"cannot list folder: {exc.strerror}")
            return
        for entry in entries:
            key = prefix + entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    yield from self._walk(Path(entry.path), key + "/")
                    continue
            except OSError:
                pass
            if not key_selected(key, self.include, self.exclude):
                continue
            yield self._stat(entry.path, key, entry.is_symlink())

    def _stat(self, path: str, key: str, is_link: bool) -> SourceObject | Reject:
        """The listed file (string paths: this runs for every file of every night)."""
        if is_link:
            target = Path(path).resolve()
            if not target.is_relative_to(self.root):
                return self._reject(Path(path), key, "symbolic link points outside the source root")
            if target.is_dir():
                return self._reject(Path(path), key, "symbolic link to a folder is not followed")
        try:
            st = os.stat(path)
        except OSError as exc:
            return self._reject(Path(path), key, f"cannot read file metadata: {exc.strerror}")
        mtime = datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC)
        return SourceObject(uri=file_uri(path), key=key, size=st.st_size, mtime=mtime)

    def _reject(self, path: Path, key: str, message: str) -> Reject:
        obj = SourceObject(uri=path.absolute().as_uri(), key=key, size=0,
                           mtime=datetime.fromtimestamp(0, tz=UTC))
        return Reject(obj, None, RejectReason.UNREADABLE, f"{key}: {message}")

    def stat(self, key: str) -> SourceObject | None:
        path = self.root / key
        if path.is_symlink() and not path.resolve().is_relative_to(self.root):
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        mtime = datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC)
        return SourceObject(uri=path.as_uri(), key=key, size=st.st_size, mtime=mtime)

    @lru_cache(maxsize=64)  # noqa: B019 - one connector per run; a folder's names are reused
    def names_in(self, folder: str) -> frozenset[str]:
        try:
            return frozenset(os.listdir(self.root / folder))
        except OSError:
            return frozenset()

    def read(self, obj: SourceObject) -> bytes:
        path = os.path.join(self._root, obj.key)
        try:
            try:
                # Not following a link at open time is the cheap check, and it cannot race.
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                if not Path(path).resolve().is_relative_to(self.root):
                    raise ConnectorError(f"{obj.key}: path leads outside the source root",
                                         uri=obj.uri) from None
                fd = os.open(path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ConnectorError(f"{obj.key}: cannot read: {exc.strerror}", uri=obj.uri) from exc
