"""Injected failures, drawn per HTTP call at the rates of :class:`EmulatorOptions`: a 429 as
from a quota shared with other clients, 500, 503, a connection reset mid-response, a stalled
response, a truncated body."""

from __future__ import annotations

import random
import threading
from typing import Any

import anyio
from starlette.responses import JSONResponse, Response

from pipeline.emulator.checks import ApiFault
from pipeline.emulator.options import EmulatorOptions, Stats
from pipeline.emulator.quota import Quotas


class Faults:
    def __init__(self, options: EmulatorOptions, stats: Stats, lock: threading.Lock) -> None:
        self.options = options
        self.stats = stats
        self._lock = lock
        self._rng = random.Random(options.seed)

    def draw(self) -> str | None:
        """The fault this call gets, if any (counted in the stats)."""
        o = self.options
        roll = self._rng.random()
        for name, rate in (("429", o.error_429), ("500", o.error_500), ("503", o.error_503),
                           ("reset", o.reset), ("stall", o.stall), ("truncate", o.truncate)):
            if roll < rate:
                with self._lock:
                    self.stats.faults[name] = self.stats.faults.get(name, 0) + 1
                return name
            roll -= rate
        return None

    async def answer(self, fault: str, quotas: Quotas) -> Response | None:
        """The response a fault replaces the call's with; None when the call goes on (after a
        stall, or to be truncated)."""
        if fault == "429":
            quota = quotas.fault("EmbedContentRequestsPerMinutePerUserPerProjectPerModel", 1.0,
                                 "requests per minute (shared with other clients)")
            return JSONResponse(quota.body(), status_code=429)
        if fault in ("500", "503"):
            code, status, msg = ((500, "INTERNAL", "Internal error encountered.")
                                 if fault == "500" else
                                 (503, "UNAVAILABLE", "The model is overloaded. Please try "
                                                      "again later."))
            return JSONResponse(ApiFault(code, status, msg).body(), status_code=code)
        if fault == "reset":
            return _ResetResponse()
        if fault == "stall":
            await anyio.sleep(self.options.stall_s)
        return None


def truncated(response: Response) -> Response:
    body = bytes(response.body)
    return Response(body[: max(1, len(body) // 2)], media_type="application/json")


class _ResetResponse(Response):
    """Start a response and drop the connection: the client sees it cut mid-way."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b'{"embeddings": [', "more_body": True})
        raise ConnectionResetError("emulated connection reset")
