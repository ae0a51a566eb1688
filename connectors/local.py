"""Local disk: a recursive, lazy walk under a root folder, in ``uri`` order.

Each folder's entries are sorted by their quoted name, a folder's with a '/' after it, so the
whole walk comes out in the byte order of the uris (``a b`` is ``a%20b``; ``x/`` sorts after
``x-y``): the order the listing stage merges against the manifest in.

Names that are not valid UTF-8 (old NFS/SMB shares, archives) are listed and read like any
other: the ``uri`` holds the raw bytes percent-encoded (as every uri does), and the ``key`` is
the name with each undecodable byte written ``%XX`` and each ``%`` written ``%25`` (a name that
is valid UTF-8 is its own key). Percent-decoding such a key gives the raw bytes back.

Symbolic links to files are followed only while they stay inside the root; a link that leads out
of it, a broken link and a link loop are each listed as a reject so the user sees it. Links to
folders are not followed (each is counted in ``skipped``, not rejected: a night does not fail for
them) unless ``follow_symlinks`` is set; then they are followed wherever they lead, and a link
back to a folder the walk is already in is skipped (no cycle). Only regular files are listed: a
FIFO, socket or device is an ``unsupported`` reject found from its metadata, never opened
(opening a FIFO blocks until someone writes to it). Reads open with O_NONBLOCK and check again
what they opened, so a file swapped for a FIFO after the listing cannot hang a run either.

A folder that cannot be listed is a reject, and its uri prefix is kept in ``unlisted``: the
files the job had there are not seen, not gone. The root gone (an unmounted share) or a share's
network error is the source's failure (:class:`~pipeline.errors.SourceUnavailable`), never a
file's.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote_from_bytes, unquote_to_bytes

import pyarrow as pa

from connectors.base import key_selected, listing_batches
from connectors.blob import Blob
from pipeline.config import LocalSourceConfig
from pipeline.errors import ConnectorError, RejectReason, SourceUnavailable
from pipeline.records import Reject, SourceObject


def file_uri(path: str) -> str:
    """``Path(path).as_uri()`` for an absolute path, without building a Path."""
    return "file://" + quote_from_bytes(os.fsencode(path))


def key_name(name: str) -> str:
    """A file name as it stands in a key: itself when it is valid UTF-8; otherwise each byte
    that does not decode as ``%XX`` and each ``%`` as ``%25`` (percent-decoding gives the raw
    bytes back)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:  # os.scandir hands undecodable bytes over as lone surrogates
        return "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff"
                       else "%25" if c == "%" else c for c in name)


class LocalConnector:
    def __init__(self, config: LocalSourceConfig) -> None:
        self.root = config.root.resolve()
        self._root = str(self.root)
        self.include = config.include
        self.exclude = config.exclude
        self.follow = config.follow_symlinks
        self.skipped = 0  # links to folders passed over by design (not rejects)
        self.unlisted: list[str] = []  # uri prefixes of folders that could not be listed
        # Reading a small file from a local disk is CPU work under the GIL (page cache, a few
        # system calls): threads only trade it. From a network share each read waits.
        self.reads_wait = on_network_share(self._root)

    def list(self) -> Iterator[SourceObject | Reject]:
        try:
            os.scandir(self.root).close()
        except OSError as exc:
            # The root itself gone or unreadable is the source's failure, not a file's: the
            # run fails (and deletes nothing) instead of seeing every file removed.
            what = ("does not exist (an unmounted share? check source.root)"
                    if exc.errno == errno.ENOENT else f"cannot be listed: {exc.strerror}")
            raise ConnectorError(f"the source folder {self.root} {what}; nothing was "
                                 "deleted") from exc
        self.skipped = 0
        self.unlisted = []
        yield from self._walk(self.root, "", {_folder_id(self._root)})

    def list_batches(self) -> Iterator[pa.RecordBatch]:
        return listing_batches(self.list())

    def _walk(self, folder: Path, prefix: str,
              within: set[tuple[int, int]]) -> Iterator[SourceObject | Reject]:
        """``within``: the (device, inode) of the folders the walk is in, to stop link cycles."""
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=_uri_order)
        except OSError as exc:
            if (failed := source_failure(self.root, exc, f"listing {prefix or '.'}")):
                raise failed from exc
            # its files are not seen this run, which does not make them gone: their rows stay
            self.unlisted.append(file_uri(str(folder.absolute())) + "/")
            yield self._reject(folder, prefix.rstrip("/") or ".", f"cannot list folder: {exc.strerror}")
            return
        for entry in entries:
            key = prefix + key_name(entry.name)
            try:
                if entry.is_dir():  # a folder, or a link to one
                    inside = self._enter(entry, within)
                    if inside is None:
                        self.skipped += 1
                    else:
                        yield from self._walk(Path(entry.path), key + "/", inside)
                    continue
            except OSError:
                pass  # a broken or looping link: _stat says which
            if not key_selected(key, self.include, self.exclude):
                continue
            yield self._stat(entry.path, key, entry.is_symlink())

    def _enter(self, entry: os.DirEntry[str],
               within: set[tuple[int, int]]) -> set[tuple[int, int]] | None:
        """The folders the walk is in once inside ``entry``, or None where it is not entered:
        a link to a folder not followed, or a folder the walk is in already (a cycle)."""
        if entry.is_symlink() and not self.follow:
            return None
        folder_id = _folder_id(entry.path)
        return None if folder_id in within else within | {folder_id}

    def _stat(self, path: str, key: str, is_link: bool) -> SourceObject | Reject:
        """The listed file (string paths: this runs for every file of every night)."""
        if is_link:
            try:
                target = Path(path).resolve(strict=True)
            except (OSError, RuntimeError) as exc:  # RuntimeError: Python 3.11's loop error
                if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
                    return self._reject(Path(path), key, "symbolic link loop (the link leads "
                                        "back to itself); fix or remove it")
                return self._reject(Path(path), key, "symbolic link target is missing "
                                    f"({os.fsdecode(os.readlink(path))!r})")
            if not self.follow and not target.is_relative_to(self.root):
                return self._reject(Path(path), key, "symbolic link points outside the source root")
        try:
            st = os.stat(path)
        except OSError as exc:
            if (failed := source_failure(self.root, exc, f"listing {key}")):
                raise failed from exc
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
        try:
            if path.is_symlink() and not self.follow and \
                    not path.resolve().is_relative_to(self.root):
                return None
            st = path.stat()
        except (OSError, RuntimeError):  # RuntimeError: a link loop (Python 3.11)
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        mtime = datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC)
        return SourceObject(uri=path.as_uri(), key=key, size=st.st_size, mtime=mtime)

    def _path(self, obj: SourceObject) -> str:
        """Where the object is: its uri holds the name's raw bytes (its key may not)."""
        uri = obj.uri
        if uri.startswith("file://"):
            # nothing escaped (most names): the rest of the uri is the path as it is
            return uri[7:] if "%" not in uri else os.fsdecode(unquote_to_bytes(uri[7:]))
        return os.path.join(self._root, obj.key)

    @lru_cache(maxsize=64)  # noqa: B019 - one connector per run; a folder's names are reused
    def names_in(self, folder: str) -> frozenset[str]:
        try:
            return frozenset(key_name(n) for n in os.listdir(self.root / folder))
        except OSError:
            return frozenset()

    def read(self, obj: SourceObject) -> bytes:
        with self._open(obj) as f:
            return self._checked(obj, f.read)

    def fetch(self, obj: SourceObject) -> Blob:
        fd, size = self._open_fd(obj)
        if not Blob.large(size):
            # open, fstat, read, close: each system call hands the GIL over to a thread that
            # waits for it (the event loop, the other validation workers), so the fewer the
            # better (a buffered file object made eight of them for a small text)
            try:
                return Blob.of(self._checked(obj, lambda: _read_all(fd, size)))
            finally:
                os.close(fd)
        try:
            # read where it is: no copy, no RSS; its read errors are the connector's
            return Blob.file_at(os.fdopen(fd, "rb"), size,
                                failed=lambda exc: self._read_failed(obj, exc))
        except BaseException:
            os.close(fd)
            raise

    def ranged(self, obj: SourceObject) -> Blob:
        return self.fetch(obj)

    def _open(self, obj: SourceObject) -> BinaryIO:
        """The regular file behind ``obj``, opened without following a link out of the root."""
        fd, _ = self._open_fd(obj)
        try:
            return os.fdopen(fd, "rb")
        except OSError as exc:
            os.close(fd)
            raise self._read_failed(obj, exc) from exc

    def _open_fd(self, obj: SourceObject) -> tuple[int, int]:
        """The regular file behind ``obj`` (a descriptor the caller closes) and its size,
        opened without following a link out of the root."""
        path = self._path(obj)
        try:
            try:
                # Not following a link at open time is the cheap check, and it cannot race.
                fd = os.open(path, _READ_FLAGS | os.O_NOFOLLOW)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                if not self.follow and not Path(path).resolve().is_relative_to(self.root):
                    raise ConnectorError(f"{obj.key}: path leads outside the source root",
                                         uri=obj.uri) from None
                fd = os.open(path, _READ_FLAGS)
        except OSError as exc:
            raise self._read_failed(obj, exc) from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise self._read_failed(obj, exc) from exc
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ConnectorError(f"{obj.key}: not a regular file ({_kind(st.st_mode)})",
                                 uri=obj.uri)
        return fd, st.st_size

    def _checked(self, obj: SourceObject, read: Callable[[], bytes]) -> bytes:
        try:
            return read()
        except OSError as exc:
            raise self._read_failed(obj, exc) from exc

    def _read_failed(self, obj: SourceObject, exc: OSError) -> ConnectorError:
        """A failed read as the file's error (a reject), or as the source's."""
        return (source_failure(self.root, exc, f"reading {obj.key}")
                or ConnectorError(f"{obj.key}: cannot read: {exc.strerror}", uri=obj.uri))


def source_failure(root: Path, exc: OSError, doing: str) -> SourceUnavailable | None:
    """``exc`` as the source's failure when the share or the disk failed, or the root is gone
    (an unmounted share): the run stops, blaming no file and deleting nothing."""
    if exc.errno in SOURCE_ERRNOS:
        return SourceUnavailable(f"{doing}: the source folder {root} failed: {exc.strerror}")
    if exc.errno == errno.ENOENT and not root.is_dir():
        return SourceUnavailable(f"{doing}: the source folder {root} is gone (an unmounted "
                                 "share?)")
    return None


# A read failing with one of these failed for the share or the disk, not for the file.
SOURCE_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ETIMEDOUT", "ESTALE", "ENOTCONN", "EHOSTDOWN", "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH",
    "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "EREMOTEIO", "ENOLINK") if hasattr(errno, name))

# File systems whose reads wait on a network (or a user-space daemon): worth reading in parallel.
NETWORK_FILE_SYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs",
                                  "9p", "afs", "lustre", "gpfs", "beegfs", "virtiofs"})


def on_network_share(path: str, mounts: str = "/proc/self/mounts") -> bool:
    """Whether ``path`` lies on a network or FUSE file system, by the mount table (where there
    is none to read, as off Linux: assumed so, which keeps reads parallel)."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            table = [fields[1:3] for fields in map(str.split, f) if len(fields) >= 3]
    except OSError:
        return True
    best, kind = "", ""
    for point, fs in table:
        point = point.replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fs
    return kind in NETWORK_FILE_SYSTEMS or kind.startswith("fuse")


def _read_all(fd: int, size: int) -> bytes:
    """A file of ``size`` bytes (by its fstat) whole: one read when it has not grown since;
    a file that grew or shrank meanwhile is read to its end as it is now."""
    data = os.read(fd, size + 1)
    if len(data) == size or not data:
        return data
    chunks = [data]
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _folder_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


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
