"""The emulator's view of one EmbedContentRequest: parse it the way Google does and enforce the
model's limits, answering with Google's error shapes.

Accepts camelCase and snake_case (``inlineData``/``inline_data``, ``mimeType``/``mime_type``),
as Google does: the google-genai SDK sends snake_case inside parts.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError
from pypdf import PdfReader
from pypdf.errors import PyPdfError

from pipeline.errors import ItemRejected
from pipeline.models import (
    AUDIO_MIMES,
    IMAGE_MIMES,
    MAX_DIMENSIONS,
    MIN_DIMENSIONS,
    PDF_MIME,
    TOKENS_PER_AUDIO_SECOND,
    TOKENS_PER_IMAGE,
    TOKENS_PER_PDF_PAGE,
    TOKENS_PER_VIDEO_FRAME,
    VIDEO_MAX_FRAMES,
    VIDEO_MIMES,
    ModelSpec,
    text_tokens,
)
from pipeline.models import (
    TASK_TYPES as MODEL_TASK_TYPES,
)
from pipeline.validate.measure import probe

TASK_TYPES = frozenset({"TASK_TYPE_UNSPECIFIED", *MODEL_TASK_TYPES})


_URLSAFE = str.maketrans("-_", "+/")


class ApiFault(Exception):
    """An error the emulator answers with, in Google's body shape."""

    def __init__(self, code: int, status: str, message: str,
                 details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.details = details or []

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            err["details"] = self.details
        return {"error": err}


def invalid(message: str) -> ApiFault:
    return ApiFault(400, "INVALID_ARGUMENT", message)


@dataclass
class ParsedRequest:
    parts: list[str | bytes]
    dims: int
    task_type: str | None
    tokens: dict[str, int] = field(default_factory=dict)  # per modality, Google's names

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())


def _get(d: dict[str, Any], camel: str, snake: str) -> Any:
    return d.get(camel, d.get(snake))


def _media_seconds(data: bytes, kind: str) -> float:
    """The length as the validator measures it (what demuxes or decodes): one measure for
    both sides, so a file the validator passes is never over the limit here."""
    try:
        return probe(data).measured_s
    except ItemRejected as exc:
        raise invalid(f"Unable to process input {kind}: {exc.message}") from exc


def _check_part(part: Any, spec: ModelSpec, index: int, req: ParsedRequest) -> None:
    if not isinstance(part, dict):
        raise invalid(f"Invalid value at 'content.parts[{index}]': expected an object")
    keys = {"text"} if len(part) == 1 and "text" in part else {  # the usual part, at once
        k for k in part if k in ("text", "inlineData", "inline_data", "fileData", "file_data")}
    if len(keys) != 1:
        raise invalid(f"content.parts[{index}] must hold exactly one of text, inlineData, fileData")
    if "text" in keys:
        if not isinstance(part["text"], str):
            raise invalid(f"Invalid value at 'content.parts[{index}].text': expected a string")
        req.parts.append(part["text"])
        req.tokens["TEXT"] = req.tokens.get("TEXT", 0) + text_tokens(part["text"])
        return
    if keys & {"fileData", "file_data"}:
        raise invalid("fileData URIs are not supported by this emulator; send inlineData")
    inline = _get(part, "inlineData", "inline_data")
    if not isinstance(inline, dict):
        raise invalid(f"Invalid value at 'content.parts[{index}].inline_data'")
    mime = _get(inline, "mimeType", "mime_type")
    raw = inline.get("data")
    if not isinstance(mime, str) or not isinstance(raw, str):
        raise invalid(f"content.parts[{index}].inline_data needs mime_type and data")
    try:
        # Protobuf's JSON mapping accepts standard and URL-safe base64, padded or not; the
        # google-genai SDK sends URL-safe.
        raw = raw.translate(_URLSAFE)
        data = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(f"Invalid value at 'content.parts[{index}].inline_data.data' "
                      "(TYPE_BYTES), Base64 decoding failed") from exc
    if not spec.accepts(mime) or mime.startswith("text/"):
        raise invalid(f"Unsupported MIME type: {mime}")
    _check_media(data, mime, spec, req)
    req.parts.append(data)


def _check_media(data: bytes, mime: str, spec: ModelSpec, req: ParsedRequest) -> None:
    if mime in IMAGE_MIMES:
        try:
            Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]).verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise invalid("Unable to process input image. Please retry or report in "
                          "https://developers.generativeai.google/guide/troubleshooting") from exc
        req.tokens["IMAGE"] = req.tokens.get("IMAGE", 0) + TOKENS_PER_IMAGE
    elif mime == PDF_MIME:
        try:
            pages = len(PdfReader(io.BytesIO(data), strict=False).pages)
        except (PyPdfError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise invalid("Unable to process input document: the PDF cannot be read") from exc
        if pages > spec.max_pdf_pages:
            raise invalid(f"The document has {pages} pages; at most {spec.max_pdf_pages} pages "
                          "are supported per request")
        req.tokens["DOCUMENT"] = req.tokens.get("DOCUMENT", 0) + pages * TOKENS_PER_PDF_PAGE
    elif mime in AUDIO_MIMES:
        seconds = _media_seconds(data, "audio")
        if seconds > spec.max_audio_s:
            raise invalid(f"Audio is {seconds:.1f} s long; at most {spec.max_audio_s:g} s "
                          "are supported")
        req.tokens["AUDIO"] = req.tokens.get("AUDIO", 0) + math.ceil(
            seconds * TOKENS_PER_AUDIO_SECOND)
    elif mime in VIDEO_MIMES:
        seconds = _media_seconds(data, "video")
        if seconds > spec.max_video_s:
            raise invalid(f"Video is {seconds:.1f} s long; at most {spec.max_video_s:g} s "
                          "are supported")
        frames = min(VIDEO_MAX_FRAMES, max(1, math.ceil(seconds)))
        req.tokens["VIDEO"] = req.tokens.get("VIDEO", 0) + frames * TOKENS_PER_VIDEO_FRAME


def parse_request(body: Any, spec: ModelSpec, *, in_batch: bool) -> ParsedRequest:
    """Validate one EmbedContentRequest against the model's limits."""
    if not isinstance(body, dict):
        raise invalid("Invalid JSON payload received. Expected an EmbedContentRequest object.")
    if in_batch:
        model = body.get("model")
        if model != f"models/{spec.name}":
            raise invalid(
                f"Model mismatch: request model {model!r} does not match "
                f"'models/{spec.name}' in the URL"
            )
    content = body.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list) or not parts:
        raise invalid("* BatchEmbedContentsRequest.requests[].content: contents is not specified"
                      if in_batch else "* EmbedContentRequest.content: contents is not specified")
    dims = _get(body, "outputDimensionality", "output_dimensionality")
    dims = MAX_DIMENSIONS if dims is None else dims
    if not isinstance(dims, int) or not MIN_DIMENSIONS <= dims <= MAX_DIMENSIONS:
        raise invalid(f"outputDimensionality must be between {MIN_DIMENSIONS} and "
                      f"{MAX_DIMENSIONS}, got {dims!r}")
    task = _get(body, "taskType", "task_type")
    if task is not None and task not in TASK_TYPES:
        raise invalid(f"Invalid value at 'task_type': {task!r}")
    if body.get("title") is not None and task != "RETRIEVAL_DOCUMENT":
        raise invalid("Title is only supported with task type RETRIEVAL_DOCUMENT")
    req = ParsedRequest(parts=[], dims=dims, task_type=task)
    for index, part in enumerate(parts):
        _check_part(part, spec, index, req)
    images = sum(1 for p in parts if isinstance(p, dict)
                 and str(_get(_get(p, "inlineData", "inline_data") or {}, "mimeType", "mime_type")
                         ).startswith("image/"))
    if images > spec.max_images_per_request:
        raise invalid(f"At most {spec.max_images_per_request} images are supported per request, "
                      f"got {images}")
    # The limit is enforced on text: media have their own limits (pages, seconds, images), and
    # 32 video frames at 258 tokens each would already exceed 8,192 for any video over 31 s,
    # which Google documents as accepted up to 120 s.
    if req.tokens.get("TEXT", 0) > spec.max_input_tokens:
        raise invalid(f"The input token count ({req.tokens['TEXT']}) exceeds the maximum number "
                      f"of tokens allowed ({spec.max_input_tokens}).")
    return req
