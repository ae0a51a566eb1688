"""Local disk: a recursive, lazy walk under a root folder, in ``uri`` order.

Each folder's entries are sorted by their quoted name, a folder's with a '/' after it, so the
whole walk comes out in the byte order of the uris (``a b`` is ``a%20b``; ``x/`` sorts after
``x-y``): the order the listing stage merges against the manifest in.

Symbolic links to files are followed only while they stay inside the root; a link that leads out
of it (or is broken) is listed as a reject so the user sees it. Links to folders are not followed,
which also rules out cycles. Only regular files are listed: a FIFO, socket or device is an
``unsupported`` reject found from its metadata, never opened (opening a FIFO blocks until
someone writes to it). Reads open with O_NONBLOCK and check again what they opened, so a file
swapped for a FIFO after the listing cannot hang a run either.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote_from_bytes

import pyarrow as pa

from connectors.base import key_selected, listing_batches
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
        try:
            os.scandir(self.root).close()
        except OSError as exc:
            # The root itself gone or unreadable is the source's failure, not a file's: the
            # run fails (and deletes nothing) instead of seeing every file removed.
            raise ConnectorError(f"cannot list the source folder {self.root}: "
                                 f"{exc.strerror}") from exc
        yield from self._walk(self.root, "")

    def list_batches(self) -> Iterator[pa.RecordBatch]:
        return listing_batches(self.list())

    def _walk(self, folder: Path, prefix: str) -> Iterator[SourceObject | Reject]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=_uri_order)
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
            if not os.path.exists(path):
                return self._reject(Path(path), key, "symbolic link target is missing "
                                    f"({os.readlink(path)})")
            if not target.is_relative_to(self.root):
                return self._reject(Path(path), key, "symbolic link points outside the source root")
            if target.is_dir():
                return self._reject(Path(path), key, "symbolic link to a folder is not followed")
        try:
            st = os.stat(path)
        except OSError as exc:
            return self._reject(Path(path), key, f"cannot read file metadata: {exc.strerror}")
        if not stat.S_ISREG(st.st_mode):
            return self._reject(Path(path), key, f"not a regular file ({_kind(st.st_mode)}); "
                                "it is not opened", RejectReason.UNSUPPORTED)
        mtime = datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC)
        return SourceObject(uri=file_uri(path), key=key, size=st.st_size, mtime=mtime)

    def _reject(self, path: Path, key: str, message: str,
                reason: str = RejectReason.UNREADABLE) -> Reject:
        obj = SourceObject(uri=file_uri(str(path.absolute())), key=key, size=0,
                           mtime=datetime.fromtimestamp(0, tz=UTC))
        return Reject(obj, None, reason, f"{key}: {message}")

    def stat(self, key: str) -> SourceObject | None:
        path = self.root / key
        if path.is_symlink() and not path.resolve().is_relative_to(self.root):
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
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
                fd = os.open(path, _READ_FLAGS | os.O_NOFOLLOW)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                if not Path(path).resolve().is_relative_to(self.root):
                    raise ConnectorError(f"{obj.key}: path leads outside the source root",
                                         uri=obj.uri) from None
                fd = os.open(path, _READ_FLAGS)
            with os.fdopen(fd, "rb") as f:
                mode = os.fstat(fd).st_mode
                if not stat.S_ISREG(mode):
                    raise ConnectorError(f"{obj.key}: not a regular file ({_kind(mode)})",
                                         uri=obj.uri)
                return f.read()
        except OSError as exc:
            raise ConnectorError(f"{obj.key}: cannot read: {exc.strerror}", uri=obj.uri) from exc


def _uri_order(entry: os.DirEntry[str]) -> str:
    """Where the entry's uri (and those of everything under it) sorts among its siblings'."""
    name = quote_from_bytes(os.fsencode(entry.name))
    try:
        return name + "/" if entry.is_dir(follow_symlinks=False) else name
    except OSError:
        return name


# O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer (it changes nothing
# for regular files, which are all that is read).
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a special file"
