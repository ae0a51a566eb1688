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

import base64
import hashlib
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx
import numpy as np
import numpy.typing as npt
import orjson
import simdjson

from pipeline.errors import (
    AccessError,
    BalanceExhausted,
    EmbedError,
    EndpointMismatch,
    QuotaExhausted,
    TerminalEmbedError,
    TransientEmbedError,
)
from pipeline.records import Part

AuthStyle = Literal["google", "bearer", "raw"]
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
_RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?)\s*(ms|s)\b", re.IGNORECASE)
# ErrorInfo reasons Google gives a 400 that is about the key, not the request's content.
# new-api's codes for a balance or token quota that is used up (its docs and source), and the
# Chinese sentences older versions answer instead ("额度不足": quota insufficient, "额度已用尽":
# quota used up).
BALANCE_CODES = frozenset({"insufficient_user_quota", "insufficient_quota",
                           "pre_consume_token_quota_failed", "quota_exceeded"})
_BALANCE_WORDS = re.compile(r"额度(不足|已用尽)|insufficient (user )?(quota|balance)|"
                            r"balance (is )?(exhausted|insufficient|not enough)", re.IGNORECASE)
_NO_CHANNEL = re.compile(r"no available channel|无可用渠道", re.IGNORECASE)
_PER_DAY = re.compile(r"per[ _-]?day", re.IGNORECASE)
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
KEY_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED",
                         "API_KEY_HTTP_REFERRER_BLOCKED", "API_KEY_IP_ADDRESS_BLOCKED",
                         "API_KEY_ANDROID_APP_BLOCKED", "API_KEY_IOS_APP_BLOCKED"})


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


def _html_page(raw: bytes) -> str:
    """An HTML body in a few words: its title (a gateway's or a proxy's error page)."""
    m = _TITLE.search(raw[:65536])
    title = " ".join(m.group(1).decode("utf-8", "replace").split())[:120] if m else ""
    return f"an HTML page ({title})" if title else f"an HTML page ({len(raw):,} bytes)"


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


def auth_headers(style: AuthStyle, key: str | None) -> dict[str, str]:
    if not key:
        return {}
    if style == "google":
        return {"x-goog-api-key": key}
    if style == "bearer":
        return {"authorization": f"Bearer {key}"}
    return {"authorization": key}



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
        raw = await self._post("embedContent", self.request_json(request))
        return self._decode(raw, "embedding", 1)

    async def batch_embed(self, requests: Sequence[EmbedRequest]) -> EmbedResponse:
        body = {"requests": [self.request_json(r) for r in requests]}
        raw = await self._post("batchEmbedContents", body)
        return self._decode(raw, "embeddings", len(requests))

    # --- request and response -----------------------------------------------------------------

    def request_json(self, request: EmbedRequest) -> dict[str, Any]:
        """An EmbedContentRequest as JSON (camelCase), as every endpoint takes it."""
        parts: list[dict[str, Any]] = []
        for part in request.parts:
            if part.text is not None:
                parts.append({"text": part.text})
            else:
                assert part.data is not None and part.mime is not None
                parts.append({"inlineData": {"mimeType": part.mime,
                                             "data": base64.b64encode(part.data).decode("ascii")}})
        body: dict[str, Any] = {"model": f"models/{self.model}", "content": {"parts": parts},
                                "outputDimensionality": self.dims}
        if request.task_type:
            body["taskType"] = request.task_type
        if request.title and request.task_type == "RETRIEVAL_DOCUMENT":
            body["title"] = request.title
        return body

    def content_key(self, request: EmbedRequest) -> str:
        """The content key of ``request`` with this client's model and dimensions."""
        return content_key(request, self.model, self.dims)

    def _decode(self, raw: bytes, key: str, count: int) -> EmbedResponse:
        """``count`` embeddings from a 200 response, under ``key`` ("embedding" holds one,
        "embeddings" a list). simdjson reads each ``values`` array into numpy without a Python
        float per value (a 100 x 3072 response is 4 MB of JSON)."""
        try:
            doc = simdjson.Parser().parse(raw)
        except ValueError:
            if raw.lstrip()[:1] == b"<":
                raise _mismatch(_html_page(raw), self._base) from None
            raise _malformed(f"{len(raw)} bytes of invalid JSON") from None
        if not isinstance(doc, simdjson.Object):
            raise _malformed("not a JSON object")
        if key not in doc:
            raise _mismatch(f"a JSON object with {', '.join(sorted(doc.keys())[:6]) or 'no'} "
                            "keys" if "data" not in doc else "an OpenAI-style embeddings "
                            "response", self._base)
        embeddings: Any = doc.get(key) if key == "embeddings" else [doc.get(key)]
        if not isinstance(embeddings, simdjson.Array | list) or len(embeddings) != count:
            got = len(embeddings) if isinstance(embeddings, simdjson.Array) else "no"
            raise _malformed(f"{got} embeddings for {count} requests")
        matrix = np.empty((count, self.dims), dtype=np.float32)
        for index, emb in enumerate(embeddings):
            values = emb.get("values") if isinstance(emb, simdjson.Object) else None
            if not isinstance(values, simdjson.Array):
                raise _malformed(f"embedding {index} has no values")
            if len(values) != self.dims:
                raise TerminalEmbedError(
                    f"embedding {index} has {len(values)} dimensions, {self.dims} were requested",
                    status="BAD_RESPONSE")
            try:
                row = np.frombuffer(values.as_buffer(of_type="d"), dtype=np.float64)
            except (TypeError, ValueError):
                row = _special_floats(values.as_list(), index)
            with np.errstate(over="ignore"):  # too large for float32: caught as infinity below
                matrix[index] = row
        bad = ~np.isfinite(matrix).all(axis=1)
        if bad.any():  # finite in float64 but not in float32
            raise TerminalEmbedError(f"embedding {int(np.argmax(bad))} contains NaN or infinity",
                                     status="BAD_RESPONSE")
        usage_doc = doc.get("usageMetadata") or doc.get("usage_metadata")
        usage = usage_doc.as_dict() if isinstance(usage_doc, simdjson.Object) else {}
        del doc, embeddings  # the parser's buffer is released with its last view
        return _usage_response(list(matrix), usage)

    # --- transport ----------------------------------------------------------------------------

    async def _post(self, method: str, body: dict[str, Any]) -> bytes:
        """The body of a 200 answer; any other answer raised as an :mod:`pipeline.errors` error."""
        content = await anyio.to_thread.run_sync(orjson.dumps, body)
        response = await self.request("POST", f"{self._root}:{method}", content=content)
        return response.content

    async def request(self, method: str, url: str, *, content: bytes | None = None,
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
                           params: dict[str, str] | None = None) -> AsyncIterator[str]:
        """A download's lines, streamed (a large responses file is never held whole)."""
        url = self._url(url)
        try:
            async with self._http.stream("GET", url, params=params) as response:
                if response.status_code != 200:
                    raw = await response.aread()
                    raise self._error(response.status_code, raw,
                                      response.headers.get("retry-after"))
                async for line in response.aiter_lines():
                    yield line
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
        body = ErrorBody.parse(raw)
        delays = [d for d in (body.retry_delay_s, _retry_in(body.message),
                              float(retry_after) if retry_after and retry_after.strip().isdigit()
                              else None) if d is not None]
        message = self._scrub(body.message or f"HTTP {code}")
        kwargs: dict[str, Any] = {"http_status": code, "status": body.status,
                                  "retry_after_s": max(delays) if delays else None,
                                  "quota_id": body.per_day_quota or (body.quota_ids[-1]
                                                                     if body.quota_ids else None)}
        if body.balance_exhausted or code == 402:
            return BalanceExhausted(message, **kwargs)
        if code == 429 and body.per_day_quota:
            return QuotaExhausted(message, **kwargs)
        if body.no_channel:
            return AccessError(f"{message} (endpoint {self._base}: the gateway has no channel "
                               f"serving model {self.model}: check embed.model against the "
                               "models the gateway lists, or ask its operator)", **kwargs)
        if code in TRANSIENT_STATUS:
            return TransientEmbedError(message, **kwargs)
        if code in (401, 403, 404) or (code == 400 and body.about_key):
            return AccessError(_access_message(self._base, self.model, code, body, message),
                               **kwargs)
        return TerminalEmbedError(message, **kwargs)


def _access_message(base: str, model: str, code: int, body: ErrorBody, message: str) -> str:
    """One line: what the API said, where, for which model, and what to check."""
    if body.gateway:  # a gateway's own answer: Google's project settings are not the point
        if code == 404:
            check = ("embed.model, and embed.base_url: the gateway's Gemini-compatible base, "
                     "without /v1beta")
        elif code == 401:
            check = ("the gateway token in embed.api_key (set, current, not used up?) and "
                     "embed.auth: bearer, raw or google, as the gateway's docs say")
        else:
            check = ("the gateway token's permissions (its group must include the model; a "
                     "key of the form sk-KEY-N asks for channel N, which only admins may)")
    elif code == 404:
        check = ("embed.model, and embed.base_url / embed.api_version if a gateway serves "
                 "the API under another path")
    elif code == 401 or body.about_key:
        check = ("embed.api_key (is it set, current, and a key of a project with the "
                 "Generative Language API enabled?) and embed.auth")
    else:
        check = ("the key's permissions: its project must have access to the model, the "
                 "key must not be restricted, suspended or reported as leaked")
    return f"{message} (endpoint {base}, model {model}: check {check})"


def _retry_in(message: str) -> float | None:
    """The delay in a message's "Please retry in 33.384105706s" (or "...ms")."""
    m = _RETRY_IN.search(message)
    return float(m.group(1)) / (1000 if m.group(2).lower() == "ms" else 1) if m else None


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """What an error body says, read once, in Google's shape (status, message, and the details
    that decide what to do: RetryInfo, every QuotaFailure violation, ErrorInfo reasons) or a
    gateway's OpenAI shape (message, type, code), or a body that is no JSON (an HTML page is
    shortened to its title)."""

    status: str | None = None
    message: str = ""
    retry_delay_s: float | None = None
    quota_ids: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    gateway: bool = False  # OpenAI-shaped: a gateway answered, not Google
    code: str = ""  # a gateway's error.code ("insufficient_user_quota", "429", ...)

    @property
    def per_day_quota(self) -> str | None:
        """The first per-day violation: any of them means no retry helps today. A gateway
        drops the violations; their metric is then read from the message."""
        found = next((q for q in self.quota_ids if "perday" in q.lower()), None)
        if found is None and self.gateway and _PER_DAY.search(self.message):
            return "PerDay (from the message)"
        return found

    @property
    def about_key(self) -> bool:
        return bool(KEY_REASONS.intersection(self.reasons)) or \
            self.message.lower().startswith(("api key not valid", "api key expired"))

    @property
    def balance_exhausted(self) -> bool:
        return self.code in BALANCE_CODES or (self.gateway and bool(
            _BALANCE_WORDS.search(self.message)))

    @property
    def no_channel(self) -> bool:
        return self.code == "model_not_found" or bool(_NO_CHANNEL.search(self.message))

    @classmethod
    def parse(cls, raw: bytes) -> ErrorBody:
        try:
            err = orjson.loads(raw).get("error", {})
            if isinstance(err, str):  # {"error": "..."}: some proxies
                return cls(message=err[:300], gateway=True)
            delay = None
            quota_ids: list[str] = []
            reasons: list[str] = []
            for detail in err.get("details") or []:
                kind = str(detail.get("@type", ""))
                if kind.endswith("RetryInfo"):
                    m = _DURATION.match(str(detail.get("retryDelay", "")))
                    delay = float(m.group(1)) if m else None
                elif kind.endswith("QuotaFailure"):
                    quota_ids += [str(v["quotaId"]) for v in detail.get("violations") or []
                                  if v.get("quotaId")]
                elif kind.endswith("ErrorInfo") and detail.get("reason"):
                    reasons.append(str(detail["reason"]))
            gateway = "type" in err and "status" not in err
            code = err.get("code")
            return cls(err.get("status"), str(err.get("message", "")), delay, tuple(quota_ids),
                       tuple(reasons), gateway,
                       "" if code is None or (isinstance(code, int) and not gateway) else str(code))
        except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
            if raw.lstrip()[:1] == b"<":
                return cls(message=_html_page(raw), gateway=True)
            text = " ".join(raw[:300].decode("utf-8", "replace").split())
            return cls(message=text)


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
