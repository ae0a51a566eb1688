"""The wire shapes of Google's embedding API: the request a part list becomes (camelCase JSON),
its content key (what reuse, resume and Batch API results are matched by), and a 200 answer's
embeddings and token counts read straight into numpy."""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import simdjson

from pipeline.errors import (
    EndpointMismatch,
    TerminalEmbedError,
    TransientEmbedError,
)
from pipeline.gemini.answers import html_page
from pipeline.records import Part


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    parts: tuple[Part, ...]
    task_type: str | None = None
    title: str | None = None


@dataclass(frozen=True, slots=True)
class EmbedResponse:
    vectors: list[npt.NDArray[np.float32]]
    prompt_tokens: int | None
    tokens_by_modality: dict[str, int] = field(default_factory=dict)


def _malformed(what: str) -> TransientEmbedError:
    """A 200 whose body is not what was asked for (a cut or garbled answer): worth a retry."""
    return TransientEmbedError(f"malformed response: {what}", http_status=200,
                               status="BAD_RESPONSE")


def _mismatch(what: str, base: str) -> EndpointMismatch:
    """A 200 that is no Gemini answer at all: the base URL points at another API."""
    return EndpointMismatch(
        f"the endpoint {base} answered 200 with {what}: embedpipe speaks Google's Gemini API "
        "(models/M:batchEmbedContents); point embed.base_url at the gateway's "
        "Gemini-compatible base (the one its docs give for Gemini, without /v1beta)",
        http_status=200, status="NOT_GEMINI")


def _special_floats(values: list[Any], index: int) -> npt.NDArray[np.float64]:
    """Values with protobuf's JSON spellings of special floats ("NaN", "Infinity") among the
    numbers; anything else is not a vector."""
    try:
        return np.array([v if isinstance(v, int | float) and not isinstance(v, bool) else
                         {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}[v]
                         for v in values], dtype=np.float64)
    except (KeyError, TypeError):
        raise TerminalEmbedError(f"embedding {index} has values that are not numbers",
                                 status="BAD_RESPONSE") from None


def _usage_response(vectors: list[npt.NDArray[np.float32]],
                    usage: dict[str, Any]) -> EmbedResponse:
    """The vectors with usageMetadata's token counts (both spellings, Gemini's and Vertex's)."""
    total = usage.get("promptTokenCount", usage.get("prompt_token_count"))
    details = (usage.get("promptTokenDetails") or usage.get("promptTokensDetails")
               or usage.get("prompt_tokens_details") or [])
    per: dict[str, int] = {}
    for d in details if isinstance(details, list) else []:
        count = d.get("tokenCount", d.get("token_count")) if isinstance(d, dict) else None
        if isinstance(count, int):
            modality = str(d.get("modality", "UNKNOWN"))
            per[modality] = per.get(modality, 0) + count
    return EmbedResponse(vectors, total if isinstance(total, int) else None, per)


def content_key(request: EmbedRequest, model: str, dims: int) -> str:
    """A key of exactly what ``request`` sends with ``model`` and ``dims``: its parts (text
    after any template, bytes and MIME types), task type, title, model and dimensions. Two
    requests with one key get the same vector; anything that would change the vector changes
    the key. What rows are reused and results adopted by (reuse, resume, Batch API jobs)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{model}\0{dims}\0{request.task_type or ''}\0".encode())
    if request.title and request.task_type == "RETRIEVAL_DOCUMENT":
        h.update(b"title\0" + request.title.encode())
    for part in request.parts:
        if part.text is not None:
            h.update(b"\1t" + len(part.text).to_bytes(8, "big") + part.text.encode())
        else:
            assert part.data is not None
            h.update(b"\1b" + (part.mime or "").encode() + b"\0"
                     + hashlib.blake2b(part.data, digest_size=16).digest())
    return h.hexdigest()


def request_json(request: EmbedRequest, model: str, dims: int,
                 inline: list[bytes] | None = None) -> dict[str, Any]:
    """An EmbedContentRequest as JSON (camelCase), as every endpoint takes it. With ``inline``,
    each inline payload is appended there and its ``data`` is a slot for :class:`Body`."""
    parts: list[dict[str, Any]] = []
    for part in request.parts:
        if part.text is not None:
            parts.append({"text": part.text})
        else:
            assert part.data is not None and part.mime is not None
            if inline is not None:
                data = _SLOT % len(inline)
                inline.append(part.data)
            else:
                data = base64.b64encode(part.data).decode("ascii")
            parts.append({"inlineData": {"mimeType": part.mime, "data": data}})
    body: dict[str, Any] = {"model": f"models/{model}", "content": {"parts": parts},
                            "outputDimensionality": dims}
    if request.task_type:
        body["taskType"] = request.task_type
    if request.title and request.task_type == "RETRIEVAL_DOCUMENT":
        body["title"] = request.title
    return body


# Where a payload's base64 goes in a Body's JSON (nothing in it is escaped in JSON; the random
# part keeps a text from ever holding it).
_SLOT = f"embedpipe-inline-{secrets.token_hex(8)}-%d"
BASE64_CHUNK = 3 * 256 * 1024  # raw bytes encoded at a time: 1 MB of base64


class Body:
    """A call's JSON body with each inline payload's base64 encoded as it is sent: the request
    never exists whole in memory (a 12 MB video segment held once, not also as 16 MB of base64
    and 16 MB of JSON), and its length is known up front."""

    def __init__(self, requests: list[EmbedRequest], model: str, dims: int,
                 single: bool) -> None:
        self._payloads: list[bytes] = []
        bodies = [request_json(r, model, dims, self._payloads) for r in requests]
        text = orjson.dumps(bodies[0] if single else {"requests": bodies})
        self._pieces = [text]
        for index in range(len(self._payloads)):
            head, tail = self._pieces[-1].split(b'"%s"' % (_SLOT % index).encode(), 1)
            self._pieces[-1:] = [head + b'"', b'"' + tail]
        self.length = (sum(len(p) for p in self._pieces)
                       + sum((len(d) + 2) // 3 * 4 for d in self._payloads))

    async def stream(self) -> AsyncIterator[bytes]:
        """The body, piece by piece; what is sent is let go."""
        pieces, payloads = self._pieces, self._payloads
        self._pieces, self._payloads = [], []
        for index, piece in enumerate(pieces):
            yield piece
            if index < len(payloads):
                data = memoryview(payloads[index])
                for start in range(0, len(data), BASE64_CHUNK):
                    yield base64.b64encode(data[start:start + BASE64_CHUNK])
                del data
                payloads[index] = b""


_parsers = threading.local()


def _parse(raw: bytes) -> Any:
    """``raw`` parsed by this thread's simdjson parser. A parser made for each answer costs
    more than the parse itself (its buffers are allocated and touched afresh: 13 of 22 µs an
    item at 768 dimensions); one whose last document is still referred to (an exception's
    frames) cannot be used again, and a fresh one is made."""
    parser = getattr(_parsers, "parser", None)
    if parser is None:
        parser = _parsers.parser = simdjson.Parser()
    try:
        return parser.parse(raw)
    except RuntimeError:  # the previous document is still alive
        parser = _parsers.parser = simdjson.Parser()
        return parser.parse(raw)


def decode(raw: bytes, key: str, count: int, dims: int, base: str) -> EmbedResponse:
    """``count`` embeddings from a 200 response, under ``key`` ("embedding" holds one,
    "embeddings" a list). simdjson reads each ``values`` array into numpy without a Python
    float per value (a 100 x 3072 response is 4 MB of JSON)."""
    try:
        doc = _parse(raw)
    except ValueError:
        if raw.lstrip()[:1] == b"<":
            raise _mismatch(html_page(raw), base) from None
        raise _malformed(f"{len(raw)} bytes of invalid JSON") from None
    if not isinstance(doc, simdjson.Object):
        raise _malformed("not a JSON object")
    if key not in doc:
        raise _mismatch(f"a JSON object with {', '.join(sorted(doc.keys())[:6]) or 'no'} "
                        "keys" if "data" not in doc else "an OpenAI-style embeddings "
                        "response", base)
    embeddings: Any = doc.get(key) if key == "embeddings" else [doc.get(key)]
    if not isinstance(embeddings, simdjson.Array | list) or len(embeddings) != count:
        got = len(embeddings) if isinstance(embeddings, simdjson.Array) else "no"
        raise _malformed(f"{got} embeddings for {count} requests")
    wide = np.empty((count, dims), dtype=np.float64)
    for index, emb in enumerate(embeddings):
        values = emb.get("values") if isinstance(emb, simdjson.Object) else None
        if not isinstance(values, simdjson.Array):
            raise _malformed(f"embedding {index} has no values")
        if len(values) != dims:
            raise TerminalEmbedError(
                f"embedding {index} has {len(values)} dimensions, {dims} were requested",
                status="BAD_RESPONSE")
        try:
            wide[index] = np.frombuffer(values.as_buffer(of_type="d"), dtype=np.float64)
        except (TypeError, ValueError):
            wide[index] = _special_floats(values.as_list(), index)
    matrix, finite = narrowed(wide)
    del wide
    if not all(finite):  # finite in float64 but not in float32
        raise TerminalEmbedError(f"embedding {finite.index(False)} contains NaN or infinity",
                                 status="BAD_RESPONSE")
    usage_doc = doc.get("usageMetadata") or doc.get("usage_metadata")
    usage = usage_doc.as_dict() if isinstance(usage_doc, simdjson.Object) else {}
    del doc, embeddings  # the parser's buffer is released with its last view
    return _usage_response(list(matrix), usage)


def narrowed(wide: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float32], list[bool]]:
    """Rows of float64 values as float32, and whether each row is finite there (a value too
    large for float32 becomes infinity)."""
    with np.errstate(over="ignore"):
        rows = wide.astype(np.float32)
    return rows, np.asarray(np.isfinite(rows).all(axis=1)).tolist()


def vector_from(values: list[Any], dims: int) -> npt.NDArray[np.float32]:
    """One embedding's values as float32, checked as a batchEmbedContents answer's are."""
    if len(values) != dims:
        raise TerminalEmbedError(f"an embedding has {len(values)} dimensions, {dims} "
                                 "were requested", status="BAD_RESPONSE")
    try:
        row = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        row = _special_floats(values, 0)
    with np.errstate(over="ignore"):
        out = row.astype(np.float32)
    if not np.isfinite(out).all():
        raise TerminalEmbedError("an embedding contains NaN or infinity",
                                 status="BAD_RESPONSE")
    return out
