"""A Gemini-compatible embedding server for offline runs and tests: a real HTTP server on loopback.

Routes (``v1beta`` and ``v1`` both, as Google serves them)::

    POST /{v}/models/{model}:embedContent
    POST /{v}/models/{model}:batchEmbedContents
    GET  /emulator/stats       what it served, for tests and benchmarks
    POST /emulator/reset       zero the stats
    GET  /emulator/requests    the last request bodies (inline data replaced by its size)

Authentication follows one of Google's three styles (``x-goog-api-key``, ``Authorization: Bearer``,
or the raw key; or ``any``) when a key is set. ``Emulator(gateway=GatewayOptions(...))`` puts a
stand-in for an OpenAI-style gateway in front (:mod:`pipeline.emulator.gateway`).
Use :class:`Emulator` to run it in a background thread of the current process.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.emulator.auth import authorise, presented
from pipeline.emulator.batches import BatchJobs
from pipeline.emulator.checks import ApiFault, ParsedRequest, invalid, parse_request
from pipeline.emulator.faults import Faults, truncated
from pipeline.emulator.files import FileStore
from pipeline.emulator.gateway import Gateway, GatewayOptions
from pipeline.emulator.options import AuthStyle as AuthStyle
from pipeline.emulator.options import EmulatorOptions as EmulatorOptions
from pipeline.emulator.options import Stats
from pipeline.emulator.quota import Quotas
from pipeline.emulator.vectors import request_vectors
from pipeline.memory import in_thread
from pipeline.models import MAX_BATCH_REQUESTS, MODELS, ModelSpec

log = logging.getLogger("embedpipe.emulator")
T = TypeVar("T")


def _redact(body: Any) -> Any:
    if isinstance(body, dict):
        out = {}
        for k, v in body.items():
            if k == "data" and isinstance(v, str):
                out[k] = f"<{len(v)} base64 chars>"
            else:
                out[k] = _redact(v)
        return out
    if isinstance(body, list):
        return [_redact(v) for v in body]
    return body


class EmulatorApp:
    def __init__(self, options: EmulatorOptions | None = None) -> None:
        self.options = options or EmulatorOptions()
        self.stats = Stats()
        self.requests: deque[dict[str, Any]] = deque(maxlen=self.options.keep_requests)
        self._lock = threading.Lock()
        self.faults = Faults(self.options, self.stats, self._lock)
        self.quotas = Quotas(self.options, self.stats, self._lock)
        self.files = FileStore(self.options.max_file_bytes, self.options.upload_mb_per_s,
                               self.options.download_mb_per_s)
        self.batches = BatchJobs(self.options, self.files, self.stats, self._lock)
        api = self._api
        self.app = Starlette(routes=[
            Route("/{version:str}/models/{target:str}", self.embed, methods=["POST"]),
            Route("/upload/{version:str}/files", api(self.files.upload), methods=["POST"]),
            Route("/{version:str}/files", api(self.files.list), methods=["GET"]),
            Route("/{version:str}/files/{target:str}", api(self.files.file),
                  methods=["GET", "DELETE"]),
            Route("/download/{version:str}/files/{target:str}", api(self.files.file),
                  methods=["GET"]),
            Route("/{version:str}/batches", api(self.batches.route), methods=["GET"]),
            Route("/{version:str}/batches/{target:str}", api(self.batches.route),
                  methods=["GET", "POST", "DELETE"]),
            Route("/emulator/stats", self.get_stats, methods=["GET"]),
            Route("/emulator/reset", self.reset, methods=["POST"]),
            Route("/emulator/requests", self.get_requests, methods=["GET"]),
        ])

    # --- bookkeeping --------------------------------------------------------------------------

    def _count(self, status: int) -> None:
        with self._lock:
            self.stats.by_status[str(status)] = self.stats.by_status.get(str(status), 0) + 1

    async def get_stats(self, request: Request) -> Response:
        with self._lock:
            stats = self.stats.as_dict()
        return JSONResponse({**stats, **self.files.usage()})

    async def reset(self, request: Request) -> Response:
        with self._lock:
            self.stats = Stats()
            self.requests.clear()
            self.quotas = Quotas(self.options, self.stats, self._lock)
        return JSONResponse({"ok": True})

    async def get_requests(self, request: Request) -> Response:
        with self._lock:
            return JSONResponse(list(self.requests))

    # --- faults and quotas -------------------------------------------------------------------

    def _api(self, handler: Callable[[Request], Awaitable[Response]],
             ) -> Callable[[Request], Awaitable[Response]]:
        """A Files or Batch API route: the key checked as for embedding, Google's error bodies."""
        async def endpoint(request: Request) -> Response:
            with self._lock:
                self.stats.http_requests += 1
            try:
                if request.path_params.get("version") not in ("v1beta", "v1"):
                    raise ApiFault(404, "NOT_FOUND", "API version is not served")
                authorise(request, self.options)
                response = await handler(request)
            except ApiFault as fault:
                self._count(fault.code)
                return JSONResponse(fault.body(), status_code=fault.code)
            self._count(response.status_code)
            return response
        return endpoint

    # --- embedding ----------------------------------------------------------------------------

    async def embed(self, request: Request) -> Response:
        with self._lock:
            self.stats.http_requests += 1
        fault = self.faults.draw()
        if fault is not None:
            early = await self.faults.answer(fault, self.quotas)
            if early is not None:
                if fault != "reset":  # a cut connection has no status
                    self._count(early.status_code)
                return early
        try:
            response = await self._embed(request)
            if fault == "truncate":
                response = truncated(response)
        except ApiFault as fault:
            self._count(fault.code)
            return JSONResponse(fault.body(), status_code=fault.code)
        except Exception:  # a bug here must look like Google's 500, not crash the server
            log.exception("emulator failed on a request")
            self._count(500)
            return JSONResponse(ApiFault(500, "INTERNAL", "Internal error encountered.").body(),
                                status_code=500)
        self._count(200)
        return response

    async def _embed(self, request: Request) -> Response:
        version = request.path_params["version"]
        model, _, method = request.path_params["target"].partition(":")
        if version not in ("v1beta", "v1"):
            raise ApiFault(404, "NOT_FOUND", f"API version {version} is not served")
        if method not in ("embedContent", "batchEmbedContents", "asyncBatchEmbedContent"):
            raise ApiFault(404, "NOT_FOUND", f"Method {method or '(none)'} is not found")
        style, _ = presented(request)
        with self._lock:
            self.stats.auth_seen[style or "none"] = self.stats.auth_seen.get(style or "none", 0) + 1
        authorise(request, self.options)
        spec = MODELS.get(model)
        if spec is None:
            raise ApiFault(404, "NOT_FOUND", f"models/{model} is not found for API version "
                           f"{version}, or is not supported for {method}.")
        raw = await request.body()
        if method == "asyncBatchEmbedContent":
            return await self.batches.create(request, spec, raw)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise invalid("Invalid JSON payload received.") from exc
        with self._lock:
            self.requests.append({"method": method, "model": model, "body": _redact(body)})
        if method == "embedContent":
            parsed = await _work(len(raw), lambda: parse_request(body, spec, in_batch=False))
            self.quotas.charge(1, parsed.total_tokens)
            vectors = await self._vectors([parsed], spec)
            with self._lock:
                self.stats.embed_calls += 1
            return _Json({"embedding": {"values": vectors[0]},
                          "usageMetadata": self._usage([parsed])})
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise invalid("* BatchEmbedContentsRequest.requests: requests is not specified")
        if len(requests) > MAX_BATCH_REQUESTS:
            raise invalid(f"* BatchEmbedContentsRequest.requests: at most {MAX_BATCH_REQUESTS} "
                          f"requests can be in one batch, got {len(requests)}")
        parsed_all = await _work(len(raw), lambda: self._parse_batch(requests, spec))
        self.quotas.charge(len(parsed_all), sum(p.total_tokens for p in parsed_all))
        vectors = await self._vectors(parsed_all, spec)
        with self._lock:
            self.stats.batch_calls += 1
        return _Json({"embeddings": [{"values": v} for v in vectors],
                      "usageMetadata": self._usage(parsed_all)})

    @staticmethod
    def _parse_batch(requests: list[Any], spec: ModelSpec) -> list[ParsedRequest]:
        out = []
        for i, r in enumerate(requests):
            try:
                out.append(parse_request(r, spec, in_batch=True))
            except ApiFault as fault:
                fault.message = f"requests[{i}]: {fault.message}"
                raise
        return out

    async def _vectors(self, parsed: list[ParsedRequest], spec: ModelSpec) -> list[Any]:
        """The vectors, answered after the latency model's delay. The work is done first and
        counts towards the delay (as a server's own work does), inline: in worker threads it
        would only fight the event loop for the GIL."""
        o = self.options
        delay = o.latency_ms + o.per_item_ms * len(parsed) + random.uniform(0, o.jitter_ms)
        started = time.monotonic()
        vectors = request_vectors(parsed, spec)  # orjson writes numpy natively
        remaining = delay / 1000 - (time.monotonic() - started)
        if remaining > 0:
            await anyio.sleep(remaining)
        with self._lock:
            self.stats.items += len(parsed)
            for p in parsed:
                self.stats.tokens += p.total_tokens
                for modality, n in p.tokens.items():
                    self.stats.tokens_by_modality[modality] = (
                        self.stats.tokens_by_modality.get(modality, 0) + n)
        return vectors

    @staticmethod
    def _usage(parsed: list[ParsedRequest]) -> dict[str, Any]:
        per: dict[str, int] = {}
        for p in parsed:
            for modality, n in p.tokens.items():
                per[modality] = per.get(modality, 0) + n
        total = sum(per.values())
        return {"promptTokenCount": total, "totalTokenCount": total,
                "promptTokenDetails": [{"modality": m, "tokenCount": n} for m, n in per.items()]}


async def _work(payload_bytes: int, fn: Callable[[], T]) -> T:
    """Checking a request's parts: in a worker thread when the payload is large (decoding
    megabytes of media), inline when small (a thread hop would only fight over the GIL)."""
    if payload_bytes < 256_000:
        return fn()
    return await in_thread(fn)


class _Json(JSONResponse):
    """orjson, which writes numpy arrays natively and ~10x faster than the json module."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class Emulator:
    """The emulator served by uvicorn in a daemon thread on a loopback port.

    >>> with Emulator() as emu:          # doctest: +SKIP
    ...     httpx.post(emu.base_url + "/v1beta/models/gemini-embedding-2:embedContent", ...)
    """

    def __init__(self, options: EmulatorOptions | None = None, host: str = "127.0.0.1",
                 port: int = 0, gateway: GatewayOptions | None = None) -> None:
        self.state = EmulatorApp(options)
        # Playing a gateway: it answers, and forwards what it routes to the emulator.
        self.gateway = Gateway(self.state.app, gateway) if gateway is not None else None
        self.app = self.gateway.app if self.gateway is not None else self.state.app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Emulator:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                lifespan="off", timeout_keep_alive=30,
                                timeout_graceful_shutdown=2)
        if self.state.options.reset > 0:  # each emulated reset would log a traceback
            logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        self._server = uvicorn.Server(config)
        server = self._server
        self._thread = threading.Thread(target=lambda: server.run(sockets=[sock]),
                                        name="embedpipe-emulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the emulator did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Run in the foreground (the ``embedpipe emulator`` command) until interrupted.
        The port is bound first (OSError if it cannot be), then ``on_ready(base_url)``."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        if on_ready is not None:
            on_ready(self.base_url)
        config = uvicorn.Config(self.app, log_level="info", access_log=False,
                                lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
