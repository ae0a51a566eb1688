"""The client against the real emulator over HTTP; MockTransport only for bodies the emulator
does not produce (429 RetryInfo, Vertex spellings, a key echoed back)."""

from __future__ import annotations

import json

import anyio
import httpx
import numpy as np
import pytest

from pipeline.emulator.server import Emulator
from pipeline.errors import QuotaExhausted, TerminalEmbedError, TransientEmbedError
from pipeline.gemini import EmbedRequest, GeminiClient
from pipeline.records import Part

KEY = "test-key-123"


def _text(t: str) -> EmbedRequest:
    return EmbedRequest((Part(text=t),))


async def _batch(url: str, *, key: str | None, auth: str = "google", dims: int = 256,
                 **kw) -> list[np.ndarray]:
    async with GeminiClient(base_url=url, model="gemini-embedding-2", dims=dims, api_key=key,
                            auth=auth, **kw) as client:  # type: ignore[arg-type]
        response = await client.batch_embed([_text("alpha beta"), _text("gamma delta")])
    assert response.prompt_tokens and response.tokens_by_modality["TEXT"] == response.prompt_tokens
    return response.vectors


@pytest.mark.parametrize("keyed_emulator", ["google", "bearer", "raw"], indirect=True)
def test_each_auth_style_is_accepted_by_a_server_expecting_it(keyed_emulator: Emulator):
    style = keyed_emulator.state.options.auth
    vectors = anyio.run(lambda: _batch(keyed_emulator.base_url, key=KEY, auth=style))
    assert len(vectors) == 2 and vectors[0].shape == (256,)
    assert keyed_emulator.state.stats.auth_seen == {style: 1}


@pytest.mark.parametrize("keyed_emulator", ["google"], indirect=True)
def test_auth_failures_are_terminal_and_never_echo_the_key(keyed_emulator: Emulator):
    url = keyed_emulator.base_url
    with pytest.raises(TerminalEmbedError) as wrong:
        anyio.run(lambda: _batch(url, key="not-the-key"))
    assert wrong.value.http_status == 403 and wrong.value.status == "PERMISSION_DENIED"
    assert "not-the-key" not in str(wrong.value)
    with pytest.raises(TerminalEmbedError) as missing:
        anyio.run(lambda: _batch(url, key=None))
    assert missing.value.http_status == 401
    with pytest.raises(TerminalEmbedError) as bearer:
        anyio.run(lambda: _batch(url, key=KEY, auth="bearer"))
    assert bearer.value.http_status == 401  # Google's endpoint refuses Bearer API keys


def test_base_url_with_version_and_v1_path(emulator: Emulator):
    a = anyio.run(lambda: _batch(emulator.base_url + "/v1", key=None))
    b = anyio.run(lambda: _batch(emulator.base_url, key=None, api_version="v1beta"))
    assert np.allclose(a[0], b[0])


def test_terminal_400_carries_googles_status_and_message(emulator: Emulator):
    async def call() -> None:
        async with GeminiClient(base_url=emulator.base_url, model="gemini-embedding-2",
                                dims=256) as client:
            await client.batch_embed([_text("x")] * 101)

    with pytest.raises(TerminalEmbedError) as err:
        anyio.run(call)
    assert err.value.http_status == 400 and err.value.status == "INVALID_ARGUMENT"
    assert "at most 100 requests" in str(err.value)


def test_transport_failure_is_transient():
    async def call() -> None:
        async with GeminiClient(base_url="http://127.0.0.1:9", model="gemini-embedding-2",
                                dims=256, timeout_s=2) as client:
            await client.embed(_text("x"))

    with pytest.raises(TransientEmbedError) as err:
        anyio.run(call)
    assert err.value.status == "TRANSPORT"


def _mock(status: int, body: object, headers: dict[str, str] | None = None) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=json.dumps(body).encode(), headers=headers or {})
    return httpx.MockTransport(handler)


def _quota_body(quota_id: str, delay: str) -> dict:
    return {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                      "message": "Quota exceeded for metric: embed requests. Please retry in 38.9s",
                      "details": [
                          {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                           "violations": [{"quotaId": quota_id}]},
                          {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                           "retryDelay": delay}]}}


def _call_with(transport: httpx.MockTransport, key: str | None = None, dims: int = 4):
    async def call():
        async with GeminiClient(base_url="http://gw.test", model="gemini-embedding-2", dims=dims,
                                api_key=key, transport=transport) as client:
            return await client.batch_embed([_text("a")])
    return anyio.run(call)


def test_429_per_minute_is_transient_with_retry_delay():
    body = _quota_body("EmbedContentRequestsPerMinutePerUserPerProjectPerModel-FreeTier", "38s")
    with pytest.raises(TransientEmbedError) as err:
        _call_with(_mock(429, body))
    assert not isinstance(err.value, QuotaExhausted)
    assert err.value.retry_after_s == 38.0 and err.value.http_status == 429


def test_429_per_day_is_quota_exhausted():
    body = _quota_body("EmbedContentRequestsPerDayPerUserPerProjectPerModel-FreeTier", "3600s")
    with pytest.raises(QuotaExhausted) as err:
        _call_with(_mock(429, body))
    assert "PerDay" in (err.value.quota_id or "")


def test_retry_in_message_is_used_when_retryinfo_is_absent():
    body = {"error": {"code": 503, "status": "UNAVAILABLE",
                      "message": "The model is overloaded. Please retry in 250ms."}}
    with pytest.raises(TransientEmbedError) as err:
        _call_with(_mock(503, body))
    assert err.value.retry_after_s == pytest.approx(0.25)


def test_key_echoed_by_a_gateway_is_scrubbed():
    body = {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                      "message": "bad key sk-live-abcdef given"}}
    with pytest.raises(TerminalEmbedError) as err:
        _call_with(_mock(400, body), key="sk-live-abcdef")
    assert "sk-live-abcdef" not in str(err.value) and "[REDACTED]" in str(err.value)


def test_usage_metadata_vertex_spelling_and_dimension_check():
    ok = {"embeddings": [{"values": [0.5, 0.5, 0.5, 0.5]}],
          "usageMetadata": {"promptTokenCount": 7,
                            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 7}]}}
    response = _call_with(_mock(200, ok))
    assert response.prompt_tokens == 7 and response.tokens_by_modality == {"TEXT": 7}
    with pytest.raises(TerminalEmbedError, match="3 dimensions, 4 were requested"):
        _call_with(_mock(200, {"embeddings": [{"values": [1, 2, 3]}]}))
    with pytest.raises(TerminalEmbedError, match="NaN"):
        _call_with(_mock(200, {"embeddings": [{"values": [1, 2, 3, "NaN"]}]}))
    with pytest.raises(TerminalEmbedError, match="infinity"):
        _call_with(_mock(200, {"embeddings": [{"values": [1, 2, 3, "-Infinity"]}]}))
    with pytest.raises(TerminalEmbedError, match="not numbers"):
        _call_with(_mock(200, {"embeddings": [{"values": [1, 2, True, "x"]}]}))
    with pytest.raises(TerminalEmbedError, match="infinity"):  # finite in float64 only
        _call_with(_mock(200, {"embeddings": [{"values": [1, 2, 3, 1e300]}]}))


def test_truncated_json_is_transient():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"embeddings": [{"values": [0.1, 0.')
    with pytest.raises(TransientEmbedError, match="invalid JSON"):
        _call_with(httpx.MockTransport(handler))


def test_request_body_is_camel_case():
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"embeddings": [{"values": [0.5] * 4}]})

    async def call():
        async with GeminiClient(base_url="http://gw.test", model="gemini-embedding-001", dims=4,
                                transport=httpx.MockTransport(handler)) as client:
            await client.batch_embed([EmbedRequest(
                (Part(mime="image/png", data=b"\x89PNG"),), task_type="RETRIEVAL_DOCUMENT",
                title="doc")])
    anyio.run(call)
    (req,) = seen[0]["requests"]
    assert req["model"] == "models/gemini-embedding-001"
    assert req["outputDimensionality"] == 4 and req["taskType"] == "RETRIEVAL_DOCUMENT"
    assert req["title"] == "doc"
    assert req["content"]["parts"][0]["inlineData"] == {"mimeType": "image/png",
                                                        "data": "iVBORw=="}
