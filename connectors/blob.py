"""A file's bytes as a connector hands them to validation: in memory when small, in a file when
large, so that a 2 GB video is never held in memory whole.

- :meth:`Blob.of` wraps bytes already read (small files, tests).
- :meth:`Blob.spool` copies a stream of chunks (an object store's download) to an anonymous
  temporary file, fetching the object once; the file vanishes when the blob is closed (or the
  process dies: it has no name).
- :meth:`Blob.file_at` keeps a local file open where it is (no copy).

Every reader :meth:`Blob.open` gives has a position of its own (``os.pread``), so PyAV, mutagen
and a PDF parser can read the same blob one after another, or interleaved, without moving each
other's place. Whoever fetched a blob closes it (``with blob:``); a blob never closed is closed
with its file object when it is collected.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable
from types import TracebackType
from typing import BinaryIO

from pipeline.errors import ScratchError

# Objects over this size are streamed to a temporary file instead of being read into memory.
SPOOL_BYTES = 32 * 1024 * 1024
SPOOL_CHUNK = 1024 * 1024


class Blob:
    __slots__ = ("_data", "_file", "size")

    def __init__(self, data: bytes | None, file: BinaryIO | None, size: int) -> None:
        self._data = data
        self._file = file
        self.size = size

    @classmethod
    def of(cls, data: bytes) -> Blob:
        return cls(data, None, len(data))

    @staticmethod
    def large(size: int) -> bool:
        """Too large to hold in memory: streamed to (or read from) a file."""
        return size > SPOOL_BYTES

    @classmethod
    def spool(cls, chunks: Iterable[bytes | memoryview], size_hint: int = 0) -> Blob:
        """The chunks, in memory when ``size_hint`` is small, else in a temporary file."""
        if not cls.large(size_hint):
            return cls.of(b"".join(chunks))
        try:
            # an unlinked file on POSIX: it goes when closed, or with the process
            spooled: BinaryIO = tempfile.TemporaryFile(prefix="embedpipe-")  # noqa: SIM115
        except OSError as exc:
            raise _scratch_error(exc, size_hint) from None
        try:
            size = 0
            for chunk in chunks:  # the store's errors go up as they are (the caller's)
                try:
                    size += spooled.write(chunk)
                except OSError as exc:
                    raise _scratch_error(exc, size_hint) from None
            try:
                spooled.flush()  # readers read the file, not the buffer
            except OSError as exc:
                raise _scratch_error(exc, size_hint) from None
        except BaseException:
            spooled.close()
            raise
        return cls(None, spooled, size)

    @classmethod
    def file_at(cls, opened: BinaryIO, size: int) -> Blob:
        """An open local file, read where it is: its own bytes whatever its name becomes."""
        return cls(None, opened, size)

    @property
    def in_memory(self) -> bool:
        return self._data is not None

    def head(self, n: int = 4096) -> bytes:
        if self._data is not None:
            return self._data[:n]
        return self._pread(n, 0)

    def read(self) -> bytes:
        """All of it, in memory (for kinds whose payload is the whole file: texts, images,
        PDFs); media are read through :meth:`open` instead."""
        if self._data is not None:
            return self._data
        with self.open() as reader:
            return reader.read()

    def open(self) -> BinaryIO:
        """A seekable reader from the start, with a position of its own."""
        if self._data is not None:
            return io.BytesIO(self._data)
        return io.BufferedReader(_PositionalReader(self), buffer_size=SPOOL_CHUNK)

    def sha256(self) -> str:
        if self._data is not None:
            return hashlib.sha256(self._data).hexdigest()
        digest = hashlib.sha256()
        with self.open() as reader:
            while chunk := reader.read(SPOOL_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> Blob:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _pread(self, n: int, offset: int) -> bytes:
        assert self._file is not None
        if self._file.closed:
            raise ValueError("read from a closed blob")
        return os.pread(self._file.fileno(), n, offset)


def _scratch_error(exc: OSError, size: int) -> ScratchError:
    return ScratchError(f"cannot spool a {size:,}-byte object to the temporary folder "
                        f"{tempfile.gettempdir()} ({exc.strerror or exc}): free space there or "
                        "point TMPDIR elsewhere")


class _PositionalReader(io.RawIOBase):
    """A raw reader over a blob's file, at its own offset."""

    def __init__(self, blob: Blob) -> None:
        self._blob = blob
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._blob._pread(len(buffer), self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._blob.size}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the blob")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos
