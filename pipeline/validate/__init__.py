"""The validator: decides what the API will be sent for each file.

``Validator.fit(obj, data)`` yields the file's items (one or several parts) or one reject, never
raises for a bad file: every listed file ends as at least one item or exactly one reject. It
runs in a worker thread (parsing is blocking work).

Reject reasons are the closed list in :class:`pipeline.errors.RejectReason`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import PurePosixPath

from pipeline.config import JobConfig
from pipeline.errors import ItemRejected, RejectReason
from pipeline.models import (
    IMAGE_MIMES,
    PDF_MIME,
    TOKENS_PER_IMAGE,
    TOKENS_PER_PDF_PAGE,
    model_spec,
    text_tokens,
)
from pipeline.records import Item, Modality, Part, Reject, SourceObject, Span, item_id
from pipeline.validate.image import check_image
from pipeline.validate.pdf import PdfDocument
from pipeline.validate.sniff import TEXT_EXTENSIONS, extension_mime, sniff
from pipeline.validate.text import chunk_spans, decode_text

# Tokens kept free in every text chunk for a title or task prefix the embedder may add.
PREFIX_RESERVE_TOKENS = 64


class Validator:
    def __init__(self, job: JobConfig) -> None:
        self.spec = model_spec(job.embed.model)
        self.model = job.embed.model
        self.dims = job.embed.output_dimensionality
        cfg = job.validate_
        self.cfg = cfg
        self.pdf_max_pages = cfg.pdf_max_pages or self.spec.max_pdf_pages
        self.text_max_tokens = (cfg.text_max_tokens or self.spec.max_input_tokens)
        self.text_budget = max(16, self.text_max_tokens - PREFIX_RESERVE_TOKENS)

    def fit(self, obj: SourceObject, data: bytes) -> Iterator[Item | Reject]:
        """The file's items, or one file-level reject. ``obj.version`` must be set."""
        assert obj.version is not None
        mime: str | None = None
        emitted = 0
        try:
            mime = self._mime(obj, data)
            for item in self._items(obj, data, mime):
                emitted += 1
                yield item
        except ItemRejected as exc:
            # After some parts went out, the reject is one more part and the file ends there.
            part, count = (emitted, emitted + 1) if emitted else (None, None)
            yield Reject(obj, obj.version, exc.reason, f"{obj.key}: {exc.message}", mime, part,
                         count)

    def _mime(self, obj: SourceObject, data: bytes) -> str:
        claimed = extension_mime(obj.key)
        binary_claim = claimed is not None and claimed not in TEXT_EXTENSIONS.values()
        if not data:
            if binary_claim:
                raise ItemRejected(RejectReason.CORRUPT, f"file is empty (0 bytes) but named as {claimed}")
            raise ItemRejected(RejectReason.EMPTY, "file is empty (0 bytes)")
        mime = sniff(data[:4096], obj.key)
        if (mime.startswith("text/") or mime in TEXT_EXTENSIONS.values()) and binary_claim:
                raise ItemRejected(
                    RejectReason.CORRUPT,
                    f"named as {claimed} but its bytes are plain text (no {claimed} header)",
                )
        return mime

    def _items(self, obj: SourceObject, data: bytes, mime: str) -> Iterator[Item]:
        if mime.startswith("text/") or mime in TEXT_EXTENSIONS.values():
            yield from self._text(obj, data, mime)
            return
        if not self.spec.multimodal:
            raise ItemRejected(
                RejectReason.UNSUPPORTED,
                f"{mime} cannot be embedded: {self.model} embeds text only",
            )
        if len(data) * 4 // 3 > self.cfg.max_inline_bytes and mime != PDF_MIME:
            raise ItemRejected(
                RejectReason.TOO_LARGE,
                f"{len(data):,} bytes is over the inline payload limit of "
                f"{self.cfg.max_inline_bytes:,} bytes once base64-encoded (validate.max_inline_bytes)",
            )
        if mime in IMAGE_MIMES:
            check_image(data, mime, self.cfg.max_image_pixels)
            yield self._item(obj, 0, 1, Modality.IMAGE, mime, (Part(mime=mime, data=data),),
                             TOKENS_PER_IMAGE, Span())
            return
        if mime == PDF_MIME:
            yield from self._pdf(obj, data)
            return
        raise ItemRejected(
            RejectReason.UNSUPPORTED,
            f"{mime} is not a supported input (supported: text, PNG, JPEG, PDF)",
        )

    def _text(self, obj: SourceObject, data: bytes, mime: str) -> Iterator[Item]:
        text = decode_text(data)
        if not text.strip():
            raise ItemRejected(RejectReason.EMPTY, "text file holds only white space")
        spans = list(chunk_spans(text, self.text_budget, self.cfg.text_overlap_tokens))
        for index, (start, end) in enumerate(spans):
            chunk = text[start:end]
            yield self._item(obj, index, len(spans), Modality.TEXT, mime, (Part(text=chunk),),
                             text_tokens(chunk), Span(char_start=start, char_end=end), text=chunk)

    def _pdf(self, obj: SourceObject, data: bytes) -> Iterator[Item]:
        deadline = time.monotonic() + self.cfg.file_timeout_s
        doc = PdfDocument(data)
        count = doc.part_count(self.pdf_max_pages)
        for index, part in enumerate(doc.parts(self.pdf_max_pages, deadline)):
            pages = part.page_end - part.page_start + 1
            if len(part.data) * 4 // 3 > self.cfg.max_inline_bytes:
                raise ItemRejected(
                    RejectReason.TOO_LARGE,
                    f"pages {part.page_start}-{part.page_end} are {len(part.data):,} bytes, over the "
                    f"inline limit of {self.cfg.max_inline_bytes:,} once base64-encoded",
                )
            yield self._item(obj, index, count, Modality.DOCUMENT, PDF_MIME,
                             (Part(mime=PDF_MIME, data=part.data),), pages * TOKENS_PER_PDF_PAGE,
                             Span(page_start=part.page_start, page_end=part.page_end))

    def _item(self, obj: SourceObject, part: int, count: int, modality: Modality, mime: str,
              parts: tuple[Part, ...], tokens: int, span: Span, text: str | None = None) -> Item:
        assert obj.version is not None
        return Item(
            id=item_id(obj.uri, obj.version, part, self.model, self.dims),
            source=obj, version=obj.version, part=part, part_count=count, modality=modality,
            mime=mime, parts=parts, est_tokens=tokens, span=span, text=text,
            title=PurePosixPath(obj.key).stem,
        )
