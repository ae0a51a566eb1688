"""PDFs: count pages, open the ones with an empty password, split long ones into standalone parts.

Parts are produced one at a time (a generator), so splitting a 1,000-page PDF holds one part in
memory, not all of them. Between parts the deadline is checked, so one pathological file cannot
hold a worker forever.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pypdf import PdfReader, PdfWriter
from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError, PyPdfError

from pipeline.errors import ItemRejected, RejectReason

# pypdf logs every repaired xref at WARNING; the reject message is the user-facing signal.
logging.getLogger("pypdf").setLevel(logging.ERROR)

_PARSE_ERRORS = (PyPdfError, PdfReadError, ValueError, KeyError, TypeError, AttributeError,
                 IndexError, RecursionError, AssertionError, ZeroDivisionError, OSError)


@dataclass(frozen=True, slots=True)
class PdfPart:
    page_start: int  # 1-based, inclusive
    page_end: int
    data: bytes


class PdfDocument:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reader, self.rewrite = _open(data)
        try:
            self.pages = len(self.reader.pages)
        except _PARSE_ERRORS as exc:
            raise ItemRejected(RejectReason.CORRUPT, f"PDF page tree is unreadable: {exc}") from exc
        if self.pages == 0:
            raise ItemRejected(RejectReason.CORRUPT, "PDF has no pages")

    def part_count(self, max_pages: int) -> int:
        return -(-self.pages // max_pages)

    def parts(self, max_pages: int, deadline: float) -> Iterator[PdfPart]:
        """Consecutive parts of at most ``max_pages`` pages; the original bytes when one part
        suffices and the file needs no decryption."""
        if self.pages <= max_pages and not self.rewrite:
            yield PdfPart(1, self.pages, self.data)
            return
        for first in range(0, self.pages, max_pages):
            if time.monotonic() > deadline:
                raise ItemRejected(
                    RejectReason.TIMEOUT,
                    f"splitting stopped at page {first + 1} of {self.pages}: "
                    "over the per-file time limit (validate.file_timeout_s)",
                )
            last = min(first + max_pages, self.pages)
            yield PdfPart(first + 1, last, self._write(first, last))

    def spans(self, max_pages: int) -> Iterator[PdfPart]:
        """The parts' page ranges without writing them (plan mode)."""
        for first in range(0, self.pages, max_pages):
            yield PdfPart(first + 1, min(first + max_pages, self.pages), b"")

    def _write(self, first: int, last: int) -> bytes:
        writer = PdfWriter()
        try:
            for index in range(first, last):
                writer.add_page(self.reader.pages[index])
            buf = io.BytesIO()
            writer.write(buf)
        except _PARSE_ERRORS as exc:
            raise ItemRejected(
                RejectReason.CORRUPT, f"pages {first + 1}-{last} cannot be extracted: {exc}"
            ) from exc
        return buf.getvalue()


def _open(data: bytes) -> tuple[PdfReader, bool]:
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
    except _PARSE_ERRORS as exc:
        raise ItemRejected(RejectReason.CORRUPT, f"not a readable PDF: {exc}") from exc
    if not reader.is_encrypted:
        return reader, False
    try:
        opened = reader.decrypt("")
    except (DependencyError, NotImplementedError) as exc:
        raise ItemRejected(RejectReason.ENCRYPTED, f"PDF uses unsupported encryption: {exc}") from exc
    except (FileNotDecryptedError, *_PARSE_ERRORS) as exc:
        raise ItemRejected(RejectReason.CORRUPT, f"PDF encryption dictionary is broken: {exc}") from exc
    if not opened:
        raise ItemRejected(
            RejectReason.ENCRYPTED, "PDF is encrypted and needs a password to open"
        )
    return reader, True
