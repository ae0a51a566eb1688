"""The HTTP client for Google's embedding API (and any gateway or emulator that speaks it).

It builds camelCase requests, sends them with one of three auth styles, parses embeddings and
usageMetadata (``promptTokenDetails`` and Vertex's ``promptTokensDetails``), and converts every
failure once, here, into :mod:`pipeline.errors`:

    HTTP 429 ............................ TransientEmbedError (QuotaExhausted when any violation
                                          is a per-day quota)
    HTTP 408, 5xx, transport, bad JSON .. TransientEmbedError
    401, 403, 404, 400 API_KEY_INVALID .. AccessError (the key, permission, model or endpoint:
                                          never an item's fault, never bisected)
    other 4xx ........................... TerminalEmbedError
    a 200 that is no Gemini answer ...... EndpointMismatch (an OpenAI-style body, an HTML page)

Gateways (new-api / one-api deployments) answer errors in OpenAI's shape (``error.message``,
``error.type``, ``error.code``), drop RetryInfo and QuotaFailure, and have errors of their own:
an exhausted balance (BalanceExhausted, a stop like a per-day quota), no channel for the model
(AccessError: a retry cannot help), an invalid token (AccessError with a hint about the gateway,
not Google's project settings). Both shapes are read by :class:`ErrorBody`.

The key travels in a header, never in the URL, and is scrubbed from any text that could reach
an exception message. Retrying is the caller's decision (see :mod:`pipeline.stages.embedding`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import httpcore
import httpx

from pipeline.errors import (
    EmbedError,
    TransientEmbedError,
)
from pipeline.gemini.answers import TRANSIENT_STATUS, ErrorBody, error_for
from pipeline.gemini.wire import (
    Body,
    EmbedRequest,
    EmbedResponse,
    content_key,
    decode,
    request_json,
    vector_from,
)
from pipeline.memory import in_thread

__all__ = ["TRANSIENT_STATUS", "AuthStyle", "EmbedRequest", "EmbedResponse", "ErrorBody",
           "GeminiClient", "auth_headers", "content_key", "vector_from"]

AuthStyle = Literal["google", "bearer", "raw"]

# httpcore reads an answer 64 KiB at a time, and each read goes up through anyio, httpcore and
# h11 in Python: an answer of 100 vectors (0.4-1.2 MB of JSON) took 7-19 reads. A read returns
# what the socket has, so a larger size only takes fewer trips (a class attribute: this
# process's every HTTP/1.1 connection; tests/test_gemini.py checks the reads ask for it).
READ_BYTES = 1 << 20
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = READ_BYTES


def auth_headers(style: AuthStyle, key: str | None) -> dict[str, str]:
    if not key:
        return {}
    if style == "google":
        return {"x-goog-api-key": key}
    if style == "bearer":
        return {"authorization": f"Bearer {key}"}
    return {"authorization": key}


class GeminiClient:
    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        dims: int,
        api_key: str | None = None,
        auth: AuthStyle = "google",
        api_version: str = "v1beta",
        timeout_s: float = 120.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.model = model.removeprefix("models/")
        self.dims = dims
        # What makes the same client in another process (a Ray actor). Holds the key: never
        # logged or shown.
        self.options = {"base_url": base_url, "model": model, "dims": dims, "api_key": api_key,
                        "auth": auth, "api_version": api_version, "timeout_s": timeout_s,
                        "max_connections": max_connections}
        self._secret = api_key or None
        base = base_url.rstrip("/")
        if not re.search(r"/v1(beta)?$", base):
            base = f"{base}/{api_version}"
        self._base = base
        self._root = f"{base}/models/{self.model}"
        self._http = httpx.AsyncClient(
            headers={"content-type": "application/json", **auth_headers(auth, api_key)},
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> GeminiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- public calls -------------------------------------------------------------------------

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        raw = await self._post("embedContent", [request], single=True)
        return self._decode(raw, "embedding", 1)

    async def batch_embed(self, requests: Sequence[EmbedRequest]) -> EmbedResponse:
        raw = await self._post("batchEmbedContents", list(requests), single=False)
        return self._decode(raw, "embeddings", len(requests))

    # --- request and response -----------------------------------------------------------------

    def request_json(self, request: EmbedRequest) -> dict[str, Any]:
        """An EmbedContentRequest as JSON (camelCase), as every endpoint takes it."""
        return request_json(request, self.model, self.dims)

    def content_key(self, request: EmbedRequest) -> str:
        """The content key of ``request`` with this client's model and dimensions."""
        return content_key(request, self.model, self.dims)

    def _decode(self, raw: bytes, key: str, count: int) -> EmbedResponse:
        return decode(raw, key, count, self.dims, self._base)

    # --- transport ----------------------------------------------------------------------------

    async def _post(self, method: str, requests: list[EmbedRequest], single: bool) -> bytes:
        """The body of a 200 answer; any other answer raised as an :mod:`pipeline.errors` error.
        The request goes as a stream of known length, its payloads base64-encoded as they are
        sent (:class:`~pipeline.gemini.wire.Body`); a stream also keeps no body once sent,
        where an httpx response and its stream, which refer to each other, would keep their
        request, body and all, until the cyclic collector ran."""
        body = await in_thread(Body, requests, self.model, self.dims, single)
        response = await self.request("POST", f"{self._root}:{method}", content=body.stream(),
                                      headers={"Content-Length": str(body.length)})
        return response.content

    async def request(self, method: str, url: str, *,
                      content: bytes | AsyncIterator[bytes] | None = None,
                      headers: dict[str, str] | None = None,
                      params: dict[str, str] | None = None,
                      check: bool = True) -> httpx.Response:
        """One call with this client's auth; an answer other than 200 is raised as an
        :mod:`pipeline.errors` error (``check=False``: returned as it is), a transport failure
        as a transient one. ``url`` is absolute or relative to the API root
        (``{base}/v1beta``)."""
        url = self._url(url)
        try:
            response = await self._http.request(method, url, content=content, headers=headers,
                                                params=params)
            await response.aread()
        except httpx.TransportError as exc:
            what = url.rsplit("/", 1)[-1].split("?")[0]
            raise TransientEmbedError(
                self._scrub(f"transport error on {what}: {type(exc).__name__}: {exc}"),
                status="TRANSPORT") from None
        if check and response.status_code != 200:
            raise self._error(response.status_code, response.content,
                              response.headers.get("retry-after"))
        return response

    async def stream_lines(self, url: str, *,
                           params: dict[str, str] | None = None) -> AsyncIterator[bytes]:
        """A download's lines (bytes, without their end), streamed: a large responses file is
        never held whole."""
        url = self._url(url)
        try:
            async with self._http.stream("GET", url, params=params) as response:
                if response.status_code != 200:
                    raw = await response.aread()
                    raise self._error(response.status_code, raw,
                                      response.headers.get("retry-after"))
                rest = b""
                async for chunk in response.aiter_bytes():
                    lines = chunk.split(b"\n")
                    lines[0] = rest + lines[0]  # not rest + chunk: a copy of the whole chunk
                    rest = lines.pop()
                    for line in lines:
                        yield line
                if rest:
                    yield rest
        except httpx.TransportError as exc:
            raise TransientEmbedError(
                self._scrub(f"transport error on a download: {type(exc).__name__}: {exc}"),
                status="TRANSPORT") from None

    def _url(self, url: str) -> str:
        """``url`` absolute, or relative to the API root."""
        return url if "://" in url else f"{self._base}/{url.lstrip('/')}"

    @property
    def base(self) -> str:
        """The API root this client calls (``{base_url}/v1beta``)."""
        return self._base

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "[REDACTED]") if self._secret else text

    def _error(self, code: int, raw: bytes, retry_after: str | None) -> EmbedError:
        return error_for(code, raw, retry_after, base=self._base, model=self.model,
                         scrub=self._scrub)
