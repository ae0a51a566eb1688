"""PDFs: count pages, open the ones with an empty password, split long ones into standalone parts.

Parts are produced one at a time (a generator), so splitting a 1,000-page PDF holds one part in
memory, not all of them. Between parts the deadline is checked, so one pathological file cannot
hold a worker forever.

Where pikepdf (qpdf) is installed it opens, counts and splits (ten times faster than pypdf on a
long document); a file qpdf cannot open cleanly (damaged: qpdf would repair it; encrypted with
a password) goes to pypdf,
whose verdict (corrupt, encrypted, or opened after all) stands, and pypdf writes a part qpdf
fails on. Without pikepdf, pypdf does everything.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, BinaryIO

from pipeline.errors import ItemRejected, RejectReason
from pipeline.validate.deadline import Deadline

if TYPE_CHECKING:
    from pypdf import PdfReader

# pypdf logs every repaired xref at WARNING; the reject message is the user-facing signal.
logging.getLogger("pypdf").setLevel(logging.ERROR)

@cache
def _parse_errors() -> tuple[type[BaseException], ...]:
    """What pypdf raises on a damaged file (pypdf is imported with the first PDF: a run without
    one does not pay its memory)."""
    from pypdf.errors import PdfReadError, PyPdfError

    return (PyPdfError, PdfReadError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, RecursionError, AssertionError, ZeroDivisionError, OSError)


@dataclass(frozen=True, slots=True)
class PdfPart:
    page_start: int  # 1-based, inclusive
    page_end: int
    data: bytes


class PdfDocument:
    """A PDF opened from its bytes, or, ``by_header``, from a reader (``plan`` over a store,
    read by range): then the page count is the page tree's /Count, read from the trailer, the
    cross-reference and the tree's root, not from every page (which lie all over the file);
    only :meth:`spans` is offered."""

    def __init__(self, data: bytes | BinaryIO, by_header: bool = False) -> None:
        self.data = data
        self._qpdf: Any = _qpdf_open(data, by_header)  # False: pypdf's
        self._reader: PdfReader | None = None
        if self._qpdf is not False:
            self.pages = _root_count(self._qpdf) if by_header else len(self._qpdf.pages)
            self.rewrite = bool(self._qpdf.is_encrypted)
        else:
            self._reader, self.rewrite = _open(data)
            try:
                self.pages = len(self._reader.pages)
            except _parse_errors() as exc:
                raise ItemRejected(RejectReason.CORRUPT,
                                   f"PDF page tree is unreadable: {exc}") from exc
        if self.pages == 0:
            raise ItemRejected(RejectReason.CORRUPT, "PDF has no pages")

    def part_count(self, max_pages: int) -> int:
        return -(-self.pages // max_pages)

    def parts(self, max_pages: int, deadline: Deadline) -> Iterator[PdfPart]:
        """Consecutive parts of at most ``max_pages`` pages; the original bytes when one part
        suffices and the file needs no decryption."""
        assert isinstance(self.data, bytes), "parts are cut from a PDF in memory"
        if self.pages <= max_pages and not self.rewrite:
            yield PdfPart(1, self.pages, self.data)
            return
        for first in range(0, self.pages, max_pages):
            if deadline.passed():
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
        if self._qpdf is not False:
            try:
                return _qpdf_part(self._qpdf, first, last)
            except Exception:  # qpdf failed on this part: pypdf writes it
                pass
        if self._reader is None:
            self._reader, _ = _open(self.data)
        from pypdf import PdfWriter

        writer = PdfWriter()
        try:
            for index in range(first, last):
                writer.add_page(self._reader.pages[index])
            buf = io.BytesIO()
            writer.write(buf)
        except _parse_errors() as exc:
            raise ItemRejected(
                RejectReason.CORRUPT, f"pages {first + 1}-{last} cannot be extracted: {exc}"
            ) from exc
        return buf.getvalue()


def _stream(data: bytes | BinaryIO) -> BinaryIO:
    if isinstance(data, bytes):
        return io.BytesIO(data)
    data.seek(0)
    return data


def _qpdf_open(data: bytes | BinaryIO, by_header: bool = False) -> Any:
    """The document opened by qpdf (with the empty password, as pypdf opened it), or False
    where pikepdf is not installed or qpdf cannot open it. ``by_header``: the page tree is
    not walked (pages do not take their inherited attributes: nothing is written)."""
    try:
        import pikepdf
    except ImportError:
        return False
    try:
        pdf = pikepdf.open(_stream(data), password="", inherit_page_attributes=not by_header)
        if pdf.get_warnings() or (_root_count(pdf) if by_header else len(pdf.pages)) == 0:
            # qpdf repaired it (or found no page): pypdf's verdict on a damaged file stands
            pdf.close()
            return False
        return pdf
    except Exception:  # any failure of qpdf: pypdf does it
        return False


def _root_count(pdf: Any) -> int:
    """The page count the page tree's root states; the pages counted where it states none."""
    count = pdf.Root.Pages.get("/Count")
    try:
        return int(count) if count is not None and int(count) >= 0 else len(pdf.pages)
    except (TypeError, ValueError):
        return len(pdf.pages)


def _qpdf_part(pdf: Any, first: int, last: int) -> bytes:
    """Pages ``first`` to ``last`` (0-based, end excluded) as a standalone, unencrypted PDF."""
    import pikepdf

    part = pikepdf.new()
    with warnings.catch_warnings():  # named destinations are not kept: nothing links in a part
        warnings.simplefilter("ignore", pikepdf.PageCopyWarning)
        part.pages.extend(pdf.pages[first:last])
    buf = io.BytesIO()
    part.save(buf, compress_streams=True, deterministic_id=True)
    part.close()
    return buf.getvalue()


def _open(data: bytes | BinaryIO) -> tuple[PdfReader, bool]:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = PdfReader(_stream(data), strict=False)
    except _parse_errors() as exc:
        raise ItemRejected(RejectReason.CORRUPT, f"not a readable PDF: {exc}") from exc
    if not reader.is_encrypted:
        return reader, False
    broken: tuple[type[BaseException], ...] = (FileNotDecryptedError, *_parse_errors())
    try:
        opened = reader.decrypt("")
    except (DependencyError, NotImplementedError) as exc:
        raise ItemRejected(RejectReason.ENCRYPTED, f"PDF uses unsupported encryption: {exc}") from exc
    except broken as exc:
        raise ItemRejected(RejectReason.CORRUPT, f"PDF encryption dictionary is broken: {exc}") from exc
    if not opened:
        raise ItemRejected(
            RejectReason.ENCRYPTED, "PDF is encrypted and needs a password to open"
        )
    return reader, True
