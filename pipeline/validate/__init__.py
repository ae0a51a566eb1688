"""The validator: decides what the API will be sent for each file.

``Validator.fit(obj, data)`` yields the file's items (one or several parts) or one reject, never
raises for a bad file: every listed file ends as at least one item or exactly one reject. It
runs in a worker thread (parsing is blocking work).

Reject reasons are the closed list in :class:`pipeline.errors.RejectReason`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import BinaryIO

from connectors.blob import Blob
from pipeline.config import JobConfig
from pipeline.errors import ItemRejected, RejectReason
from pipeline.gemini.tasks import MAX_TITLE_CHARS, TaskStyle
from pipeline.models import (
    IMAGE_MIMES,
    PDF_MIME,
    TOKENS_PER_IMAGE,
    TOKENS_PER_PDF_PAGE,
    model_spec,
    text_tokens,
)
from pipeline.records import Extras, Item, Modality, Part, Reject, SourceObject, Span, item_id
from pipeline.validate.deadline import Deadline
from pipeline.validate.image import check_image, convert_to_png, probe_image
from pipeline.validate.markup import MARKUP_MIMES, visible_text
from pipeline.validate.measure import probe, probe_header
from pipeline.validate.pdf import PdfDocument
from pipeline.validate.sniff import extension_mime, is_text, sniffed_mime, stem
from pipeline.validate.text import chunk_spans, decode_text
from pipeline.validate.timed import TimedMedia

# Types no decoder here opens (FFmpeg renders neither MIDI nor tracker modules by default).
NO_DECODER = frozenset({"audio/midi", "audio/x-it"})

# Plan reads a file in a store from its header and index only when it is larger than this.
BY_HEADER_MIN_BYTES = 256 * 1024

# Tokens kept free in every text chunk for a title or task prefix the embedder may add.
PREFIX_RESERVE_TOKENS = 64


class Validator(TimedMedia):
    def __init__(self, job: JobConfig) -> None:
        self.spec = model_spec(job.embed.model)
        self.model = job.embed.model
        self.dims = job.embed.output_dimensionality
        cfg = job.validate_
        self.cfg = cfg
        self.pdf_max_pages = cfg.pdf_max_pages or self.spec.max_pdf_pages
        self.text_max_tokens = (cfg.text_max_tokens or self.spec.max_input_tokens)
        self.text_budget = max(16, self.text_max_tokens - PREFIX_RESERVE_TOKENS)
        self._extras: Extras | None = None
        self._caption: str | None = None
        self.dry = False  # plan mode: counts and spans, no payloads
        self.style = TaskStyle.for_job(job)
        self.title_from_name = job.embed.title_from == "name"

    def fit(self, obj: SourceObject, data: bytes | Blob, extras: Extras | None = None,
            deadline: Deadline | None = None) -> Iterator[Item | Reject]:
        """The file's items, or one file-level reject. ``obj.version`` must be set. ``extras``
        (a caption, a title, metadata columns) are combined into every item of the file. A
        blob is the validator's from here: closed when the items end (or are given up on).
        ``deadline`` (default: ``file_timeout_s`` from the first item on) is the caller's to
        pause while it does not pull items."""
        assert obj.version is not None
        blob = data if isinstance(data, Blob) else Blob.of(data)
        with blob:
            if extras is None:
                yield from self._fit(obj, blob, deadline)
                return
            # Validators are shared by worker threads: the file's extras go on a copy.
            per_file = copy.copy(self)
            per_file._extras = extras
            per_file._caption = self._fit_caption(extras.caption) if extras.caption else None
            yield from per_file._fit(obj, blob, deadline)

    def plan(self, obj: SourceObject, data: bytes | Blob,
             extras: Extras | None = None) -> Iterator[Item | Reject]:
        """What :meth:`fit` would yield, with the same counts, spans and token estimates, but
        without producing payloads: no PDF part is written, no media is cut or converted."""
        dry = copy.copy(self)
        dry.dry = True
        yield from dry.fit(obj, data, extras)

    def _fit(self, obj: SourceObject, data: Blob,
             deadline: Deadline | None) -> Iterator[Item | Reject]:
        assert obj.version is not None
        mime: str | None = None
        emitted = 0
        try:
            mime = sniffed_mime(obj.key, data)
            for item in self._items(obj, data, mime, deadline):
                emitted += 1
                yield item
        except ItemRejected as exc:
            # After some parts went out, the reject is one more part and the file ends there.
            yield Reject(obj, obj.version, exc.reason, f"{obj.key}: {exc.message}", mime,
                         emitted if emitted else None)

    def _fit_caption(self, caption: str) -> str:
        """A caption shares the request's token limit with its media: cut it to the budget."""
        budget = self.text_budget * 3  # conservative: 3 UTF-8 bytes a token
        raw = caption.encode("utf-8")
        return caption if len(raw) <= budget else raw[:budget].decode("utf-8", "ignore")

    def _items(self, obj: SourceObject, blob: Blob, mime: str,
               deadline: Deadline | None) -> Iterator[Item]:
        if is_text(mime):
            yield from self._text(obj, blob.read(), mime)
            return
        if not self.spec.multimodal:
            raise ItemRejected(
                RejectReason.UNSUPPORTED,
                f"{mime} cannot be embedded: {self.model} embeds text only",
            )
        deadline = deadline or Deadline(self.cfg.file_timeout_s)
        # plan over a store: headers and indexes, fetched by range (not the payload), for
        # files large enough that this saves reading (a small one is read as a run reads it)
        by_header = self.dry and blob.is_ranged and blob.size > BY_HEADER_MIN_BYTES
        if mime.startswith(("audio/", "video/")) and mime not in NO_DECODER:
            # media are read through the blob (a large one stays on disk)
            info = probe_header(blob) if by_header else probe(blob, deadline)
            if info.kind == "audio":
                yield from self._audio(obj, blob, _audio_mime(mime), info, deadline)
            else:
                yield from self._video(obj, blob, mime, info, deadline)
            return
        if by_header and (mime.startswith("image/") or mime == PDF_MIME):
            yield from self._by_header(obj, blob, mime)
            return
        data = blob.read()  # the payload is the whole file (or made from all of it)
        if mime in IMAGE_MIMES:
            check_image(data, mime, self.cfg.max_image_pixels)
            yield self._image(obj, data, mime, mime)
        elif mime.startswith("image/"):
            self._may_convert(mime, self.cfg.image_policy, self.cfg.image_convert_from, "image")
            if self.dry:
                probe_image(data, mime, self.cfg.max_image_pixels)
                yield self._image(obj, b"", "image/png", mime)
            else:
                png = convert_to_png(data, mime, self.cfg.max_image_pixels)
                yield self._image(obj, png, "image/png", mime)
        elif mime == PDF_MIME:
            yield from self._pdf(obj, data, deadline)
        elif mime in NO_DECODER:
            raise ItemRejected(RejectReason.UNSUPPORTED, f"{mime} has no decoder here and is not "
                               "accepted by the model")
        else:
            raise ItemRejected(
                RejectReason.UNSUPPORTED,
                f"{mime} is not a supported input (supported: text, images, PDF, audio, video)",
            )

    def _by_header(self, obj: SourceObject, blob: Blob, mime: str) -> Iterator[Item]:
        """An image or PDF planned from what its header, trailer and index say (read by range):
        its size in pixels, its page count. The item has no payload (nor content key)."""
        with blob.open() as reader:
            if mime == PDF_MIME:
                yield from self._pdf(obj, reader, Deadline.never(), by_header=True)
                return
            native = mime in IMAGE_MIMES
            if not native:
                self._may_convert(mime, self.cfg.image_policy, self.cfg.image_convert_from,
                                  "image")
            probe_image(reader, mime, self.cfg.max_image_pixels, blob.size)
        if native and not self._inline_ok(blob.size):
            raise self._too_large("the image", blob.size)
        yield self._image(obj, b"", mime if native else "image/png", mime)

    def _image(self, obj: SourceObject, data: bytes, mime: str, source_mime: str) -> Item:
        if not self._inline_ok(len(data)):
            raise self._too_large("the image", len(data))
        return self._item(obj, 0, 1, Modality.IMAGE, mime, (Part(mime=mime, data=data),),
                          TOKENS_PER_IMAGE, Span(), source_mime=source_mime)

    def _text(self, obj: SourceObject, data: bytes, mime: str) -> Iterator[Item]:
        title = None
        if mime in MARKUP_MIMES:
            text, title = visible_text(data, mime)
            if not text:
                raise ItemRejected(RejectReason.EMPTY, f"{mime} holds no visible text")
        else:
            text = decode_text(data)
        if not text or text.isspace():  # (no stripped copy made)
            raise ItemRejected(RejectReason.EMPTY, "text file holds only white space")
        spans = list(chunk_spans(text, self.text_budget, self.cfg.text_overlap_tokens))
        for index, (start, end) in enumerate(spans):
            chunk = text[start:end]
            yield self._item(obj, index, len(spans), Modality.TEXT, mime, (Part(text=chunk),),
                             text_tokens(chunk), Span(char_start=start, char_end=end), text=chunk,
                             doc_title=title)

    def _pdf(self, obj: SourceObject, data: bytes | BinaryIO, deadline: Deadline,
             by_header: bool = False) -> Iterator[Item]:
        doc = PdfDocument(data, by_header)
        count = doc.part_count(self.pdf_max_pages)
        parts = (doc.spans(self.pdf_max_pages) if self.dry
                 else doc.parts(self.pdf_max_pages, deadline))
        for index, part in enumerate(parts):
            pages = part.page_end - part.page_start + 1
            if not self._inline_ok(len(part.data)):
                raise self._too_large(f"pages {part.page_start}-{part.page_end}", len(part.data))
            yield self._item(obj, index, count, Modality.DOCUMENT, PDF_MIME,
                             (Part(mime=PDF_MIME, data=part.data),), pages * TOKENS_PER_PDF_PAGE,
                             Span(page_start=part.page_start, page_end=part.page_end))

    def _item(self, obj: SourceObject, part: int, count: int, modality: Modality, mime: str,
              parts: tuple[Part, ...], tokens: int, span: Span, text: str | None = None,
              source_mime: str | None = None, doc_title: str | None = None) -> Item:
        assert obj.version is not None
        extras = self._extras
        if self._caption is not None and modality != Modality.TEXT:
            parts = (*parts, Part(text=self._caption))
            tokens += text_tokens(self._caption)
            text = self._caption
        title = extras.title if extras and extras.title else (
            doc_title or (stem(obj.key) if self.title_from_name else None))
        template = self.style.document_template
        if template is not None:  # what the embedder will wrap each text part in
            overhead = template.replace("{title}", (title or "none")[:MAX_TITLE_CHARS])
            tokens += sum(text_tokens(overhead.replace("{text}", "")) for p in parts
                          if p.text is not None)
        return Item(
            id=item_id(obj.uri, obj.version, part, self.model, self.dims),
            source=obj, version=obj.version, part=part, part_count=count, modality=modality,
            mime=mime, parts=parts, est_tokens=tokens, span=span, text=text,
            title=title,
            source_mime=source_mime or mime, claimed_mime=extension_mime(obj.key),
            sidecar_uri=extras.sidecar_uri if extras else None,
            columns=extras.columns if extras else None,
        )


def _audio_mime(mime: str) -> str:
    """The audio format of a container sniffed as video (an .m4a is an MP4 without video)."""
    return {"video/mp4": "audio/mp4", "video/quicktime": "audio/mp4",
            "video/x-ms-asf": "audio/x-ms-wma", "video/webm": "audio/webm",
            "video/x-matroska": "audio/x-matroska"}.get(mime, mime)
