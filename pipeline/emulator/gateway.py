"""The emulator playing an OpenAI-style API gateway (a new-api / one-api deployment, as DMXAPI
and VectorNode run) in front of itself: what most users call instead of Google.

As new-api does (read from its open-source relay and router code, 2026-08):

- Only ``POST /{v1beta,v1}/models/{model}:embedContent`` and ``:batchEmbedContents`` are
  forwarded upstream (to the emulator, in process), the request rebuilt with only ``model``,
  ``content``, ``taskType``, ``title`` and ``outputDimensionality``; answers of 200 pass
  through byte for byte.
- ``:asyncBatchEmbedContent`` is routed but fails: 500 ``new_api_error`` "contents is
  required"; every other path is 404 ``Invalid URL (METHOD PATH)`` with no auth check, except
  the Files upload, which answers 200 with the dashboard's HTML (the ``plain`` flavour answers
  404 there too, as a gateway that routes nothing else does).
- The token is checked in the configured header style; a wrong one is 401 "Invalid token".
- Every error is OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``) and
  carries no ``Retry-After``: Google's 429 is rewritten to ``upstream_error`` with its message
  only (RetryInfo and the quota ids dropped).
- Faults of its own: a balance used up after ``balance_tokens`` (403
  ``insufficient_user_quota``), its per-user request limit (429 with a fixed Chinese sentence,
  or an empty body), no channel for a model (503 ``model_not_found``).
"""

from __future__ import annotations

import random
import secrets
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from pipeline.emulator.auth import presented

GatewayFlavour = Literal["new-api", "plain"]
# What new-api keeps of an EmbedContentRequest when it rebuilds it for the upstream.
KEPT_FIELDS = ("model", "content", "taskType", "title", "outputDimensionality")
RATE_LIMIT_SENTENCE = "您已达到请求数限制：1分钟内最多请求60次"  # noqa: RUF001 - new-api's own words
DASHBOARD = "<!doctype html><html><head><title>New API</title></head><body></body></html>"


@dataclass(frozen=True)
class GatewayOptions:
    """How the gateway behaves. ``token``: the user token it takes (None: any), presented as
    ``auth`` says (new-api takes every style; a gateway's docs name one)."""

    flavour: GatewayFlavour = "new-api"
    token: str | None = None
    auth: Literal["google", "bearer", "raw", "any"] = "any"
    balance_tokens: int | None = None  # the account's balance, in input tokens
    rate_limit: float = 0.0  # share of embed calls refused by its own per-user limit (429)
    rate_limit_body: Literal["sentence", "empty"] = "sentence"
    no_channel: tuple[str, ...] = ()  # models no channel serves
    # What survives of a request (an older or stricter deployment may drop more, e.g.
    # outputDimensionality: the vectors then come back at the model's default length).
    kept_fields: tuple[str, ...] = KEPT_FIELDS
    seed: int | None = None


def openai_error(status: int, message: str, type_: str, code: str | int = "") -> Response:
    return JSONResponse({"error": {"message": message, "type": type_, "param": "",
                                   "code": code}}, status_code=status)


class Gateway:
    """A Starlette app in front of ``upstream`` (the emulator's ASGI app); ``calls`` counts
    what it was asked, by kind (``embed``, ``async_batch``, ``other``)."""

    def __init__(self, upstream: Any, options: GatewayOptions | None = None) -> None:
        self.options = options or GatewayOptions()
        self.calls: Counter[str] = Counter()
        self.tokens_used = 0
        self._lock = threading.Lock()
        self._rng = random.Random(self.options.seed)
        self._upstream = httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream),
                                           base_url="http://upstream", timeout=600)
        self.app = Starlette(routes=[
            Route("/{version:str}/models/{target:str}", self.models, methods=["POST"]),
            Route("/upload/{rest:path}", self.upload, methods=["POST"]),
            Route("/{rest:path}", self.unrouted,
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ])

    def _count(self, kind: str) -> None:
        with self._lock:
            self.calls[kind] += 1

    @staticmethod
    def _request_id() -> str:
        return secrets.token_hex(12)

    async def unrouted(self, request: Request) -> Response:
        self._count("other")
        return openai_error(404, f"Invalid URL ({request.method} {request.url.path})",
                            "invalid_request_error")

    async def upload(self, request: Request) -> Response:
        if self.options.flavour == "plain":
            return await self.unrouted(request)
        self._count("other")
        return HTMLResponse(DASHBOARD)  # new-api's web UI answers paths it does not route

    async def models(self, request: Request) -> Response:
        version = request.path_params["version"]
        model, _, method = request.path_params["target"].partition(":")
        if version not in ("v1beta", "v1") or "embed" not in method.lower():
            return await self.unrouted(request)
        if method not in ("embedContent", "batchEmbedContents"):
            self._count("async_batch")
            if self.options.flavour == "plain":
                return openai_error(404, f"Invalid URL ({request.method} {request.url.path})",
                                    "invalid_request_error")
            return openai_error(500, f"contents is required (request id: {self._request_id()})",
                                "new_api_error", "invalid_request")
        self._count("embed")
        refused = self._refuse(request, model)
        if refused is not None:
            return refused
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return openai_error(400, "invalid character in request body", "new_api_error",
                                "invalid_request")
        upstream = await self._upstream.post(
            f"/{version}/models/{model}:{method}",
            content=orjson.dumps(_rebuilt(body, method, self.options.kept_fields)),
            headers={"content-type": "application/json"})
        if upstream.status_code == 200:
            usage = orjson.loads(upstream.content).get("usageMetadata") or {}
            with self._lock:
                self.tokens_used += int(usage.get("promptTokenCount") or 0)
            return Response(upstream.content, media_type="application/json")
        return _rewritten(upstream)

    def _refuse(self, request: Request, model: str) -> Response | None:
        """The gateway's own checks, in new-api's order: token, channel, balance, rate."""
        o = self.options
        style, key = presented(request)
        if o.token is not None and (key != o.token or o.auth not in ("any", style)):
            return openai_error(401, f"Invalid token (request id: {self._request_id()})",
                                "new_api_error")
        if model in o.no_channel:
            return openai_error(503, f"No available channel for model {model} under group "
                                     f"default (distributor) (request id: {self._request_id()})",
                                "new_api_error", "model_not_found")
        if o.balance_tokens is not None and self.tokens_used >= o.balance_tokens:
            return openai_error(403, "用户额度不足, 剩余额度: ＄0.000000 (request id: "  # noqa: RUF001
                                     f"{self._request_id()})", "new_api_error",
                                "insufficient_user_quota")
        with self._lock:
            limited = self._rng.random() < o.rate_limit
        if limited:
            if o.rate_limit_body == "empty":
                return Response(b"", status_code=429)
            return openai_error(429, RATE_LIMIT_SENTENCE, "new_api_error")
        return None

    async def aclose(self) -> None:
        await self._upstream.aclose()


def _rebuilt(body: Any, method: str, kept: tuple[str, ...]) -> Any:
    """The request as new-api sends it upstream: only the fields it knows survive."""
    if not isinstance(body, dict):
        return body
    if method == "batchEmbedContents":
        return {"requests": [{k: r[k] for k in kept if k in r} if isinstance(r, dict)
                             else r for r in body.get("requests") or []]}
    return {k: body[k] for k in kept if k in body}


def _rewritten(upstream: httpx.Response) -> Response:
    """An upstream error in new-api's shape: Google's message kept, everything else dropped."""
    status = upstream.status_code
    try:
        message = str(orjson.loads(upstream.content)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return openai_error(status, "openai_error", "bad_response_status_code",
                            "bad_response_status_code")
    return openai_error(status, message, "upstream_error", status)
