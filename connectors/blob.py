"""A file's bytes as a connector hands them to validation: in memory when small, in a file when
large, so that a 2 GB video is never held in memory whole.

- :meth:`Blob.of` wraps bytes already read (small files, tests).
- :meth:`Blob.spool` copies a stream of chunks (an object store's download) to an anonymous
  temporary file, fetching the object once; the file vanishes when the blob is closed (or the
  process dies: it has no name).
- :meth:`Blob.file_at` keeps a local file open where it is (no copy).
- :meth:`Blob.ranged` reads an object in a store by range, as its readers ask (``plan``: a
  media file's header and index, not its body); :attr:`Blob.fetched` counts the bytes it took.

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
from collections import OrderedDict
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import BinaryIO

from pipeline.errors import ScratchError

# Objects over this size are streamed to a temporary file instead of being read into memory.
SPOOL_BYTES = 32 * 1024 * 1024
SPOOL_CHUNK = 1024 * 1024
# A ranged blob fetches blocks of this size (one request for a run of missing blocks) and keeps
# the last RANGE_KEPT of them: a header read in small steps costs one request, not hundreds.
RANGE_BLOCK = 64 * 1024
RANGE_KEPT = 256


class Blob:
    __slots__ = ("_data", "_failed", "_file", "_ranges", "size")

    def __init__(self, data: bytes | None, file: BinaryIO | None, size: int,
                 ranges: _Ranges | None = None,
                 failed: Callable[[OSError], Exception] | None = None) -> None:
        self._data = data
        self._file = file
        self._ranges = ranges
        self._failed = failed  # a read error of the file, as the connector's error
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
    def file_at(cls, opened: BinaryIO, size: int,
                failed: Callable[[OSError], Exception] | None = None) -> Blob:
        """An open local file, read where it is: its own bytes whatever its name becomes. A
        read that fails raises ``failed(the OSError)`` (the connector's error), if given."""
        return cls(None, opened, size, failed=failed)

    @classmethod
    def ranged(cls, fetch: Callable[[int, int], bytes], size: int) -> Blob:
        """An object read by range as it is read: ``fetch(start, end)`` returns those bytes
        (end excluded). Nothing is fetched until a reader asks."""
        return cls(None, None, size, _Ranges(fetch, size))

    @property
    def in_memory(self) -> bool:
        return self._data is not None

    @property
    def is_ranged(self) -> bool:
        """Read by range from a store: reading all of it costs a download."""
        return self._ranges is not None

    @property
    def read_error(self) -> Exception | None:
        """The first error fetching a range raised (a parser reading it may have hidden it)."""
        return self._ranges.error if self._ranges is not None else None

    @property
    def fetched(self) -> int:
        """The bytes taken from the store so far (a ranged blob); else the bytes held."""
        return self._ranges.fetched if self._ranges is not None else self.size

    def head(self, n: int = 4096) -> bytes:
        if self._data is not None:
            return self._data[:n]
        return self._pread(n, 0)

    def read(self) -> bytes:
        """All of it, in memory (for kinds whose payload is the whole file: texts, images,
        PDFs); media are read through :meth:`open` instead."""
        if self._data is not None:
            return self._data
        if self._ranges is not None:
            return self._ranges.read(self.size, 0)  # one request
        with self.open() as reader:
            return reader.read()

    def open(self) -> BinaryIO:
        """A seekable reader from the start, with a position of its own."""
        if self._data is not None:
            return io.BytesIO(self._data)
        buffer = RANGE_BLOCK if self._ranges is not None else SPOOL_CHUNK
        return io.BufferedReader(_PositionalReader(self), buffer_size=buffer)

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
        if self._ranges is not None:
            return self._ranges.read(n, offset)
        assert self._file is not None
        if self._file.closed:
            raise ValueError("read from a closed blob")
        try:
            return os.pread(self._file.fileno(), n, offset)
        except OSError as exc:
            if self._failed is None:
                raise
            raise self._failed(exc) from exc


def _scratch_error(exc: OSError, size: int) -> ScratchError:
    return ScratchError(f"cannot spool a {size:,}-byte object to the temporary folder "
                        f"{tempfile.gettempdir()} ({exc.strerror or exc}): free space there or "
                        "point TMPDIR elsewhere")


class _Ranges:
    """An object's blocks, fetched by range on first use; the last :data:`RANGE_KEPT` kept."""

    def __init__(self, fetch: Callable[[int, int], bytes], size: int) -> None:
        self._fetch = fetch
        self._size = size
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self.fetched = 0
        self.error: Exception | None = None

    def read(self, n: int, offset: int) -> bytes:
        end = min(offset + n, self._size)
        if offset >= end:
            return b""
        first, last = offset // RANGE_BLOCK, (end - 1) // RANGE_BLOCK
        missing = [b for b in range(first, last + 1) if b not in self._blocks]
        got: dict[int, bytes] = {}
        if missing:  # one request from the first missing block to the last
            start = missing[0] * RANGE_BLOCK
            stop = min((missing[-1] + 1) * RANGE_BLOCK, self._size)
            try:
                data = self._fetch(start, stop)
            except Exception as exc:
                self.error = self.error or exc
                raise
            self.fetched += len(data)
            for b in range(missing[0], missing[-1] + 1):
                got[b] = data[(b - missing[0]) * RANGE_BLOCK:(b - missing[0] + 1) * RANGE_BLOCK]
        chunks = []
        for b in range(first, last + 1):
            block = got[b] if b in got else self._blocks[b]
            self._blocks[b] = block
            self._blocks.move_to_end(b)
            chunks.append(block)
        while len(self._blocks) > RANGE_KEPT:
            self._blocks.popitem(last=False)
        skip = offset - first * RANGE_BLOCK
        return b"".join(chunks)[skip:skip + (end - offset)]


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
