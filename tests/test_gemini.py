"""The client against the real emulator over HTTP; MockTransport only for bodies the emulator
does not produce (429 RetryInfo, Vertex spellings, a key echoed back)."""

from __future__ import annotations

import json

import anyio
import httpcore
import httpx
import numpy as np
import pytest

from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.errors import AccessError, QuotaExhausted, TerminalEmbedError, TransientEmbedError
from pipeline.gemini.client import EmbedRequest, GeminiClient
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
def test_auth_failures_are_access_errors_that_never_echo_the_key(keyed_emulator: Emulator):
    """Google's own answers: a wrong key is a 400 whose ErrorInfo says API_KEY_INVALID, no key
    is a 403, a Bearer key at Google's endpoint a 401. None is an item's fault."""
    url = keyed_emulator.base_url
    with pytest.raises(AccessError) as wrong:
        anyio.run(lambda: _batch(url, key="not-the-key"))
    assert wrong.value.http_status == 400 and wrong.value.status == "INVALID_ARGUMENT"
    assert "not-the-key" not in str(wrong.value)
    text = str(wrong.value)
    assert url in text and "gemini-embedding-2" in text and "embed.api_key" in text
    with pytest.raises(AccessError) as missing:
        anyio.run(lambda: _batch(url, key=None))
    assert missing.value.http_status == 403
    with pytest.raises(AccessError) as bearer:
        anyio.run(lambda: _batch(url, key=KEY, auth="bearer"))
    assert bearer.value.http_status == 401  # Google's endpoint refuses Bearer API keys


def test_leaked_key_and_unknown_model_are_access_errors():
    with Emulator(EmulatorOptions(revoked_keys=("leaked-key-1",))) as emu:
        with pytest.raises(AccessError) as leaked:
            anyio.run(lambda: _batch(emu.base_url, key="leaked-key-1"))
        assert leaked.value.http_status == 403 and "leaked" in str(leaked.value)
        assert "leaked-key-1" not in str(leaked.value)

        async def unknown() -> None:
            async with GeminiClient(base_url=emu.base_url, model="gemini-embedding-9",
                                    dims=256) as client:
                await client.embed(_text("x"))

        with pytest.raises(AccessError) as missing_model:
            anyio.run(unknown)
        assert missing_model.value.http_status == 404
        assert "embed.model" in str(missing_model.value)


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
    # RetryInfo says "38s", the message "Please retry in 38.9s": the longer one is waited.
    assert err.value.retry_after_s == pytest.approx(38.9) and err.value.http_status == 429


def test_429_per_day_is_quota_exhausted():
    body = _quota_body("EmbedContentRequestsPerDayPerUserPerProjectPerModel-FreeTier", "3600s")
    with pytest.raises(QuotaExhausted) as err:
        _call_with(_mock(429, body))
    assert "PerDay" in (err.value.quota_id or "")


# Recorded from Google (generativelanguage.googleapis.com, 2026): the per-day violation is
# listed first, two per-minute ones after it; RetryInfo rounds the message's delay down.
GOOGLE_429_PER_DAY = {"error": {
    "code": 429, "status": "RESOURCE_EXHAUSTED",
    "message": "You exceeded your current quota, please check your plan and billing details. "
               "For more information on this error, head to: "
               "https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current "
               "usage, head to: https://ai.dev/rate-limit. \n* Quota exceeded for metric: "
               "generativelanguage.googleapis.com/embed_content_free_tier_requests, limit: 1000, "
               "model: gemini-embedding-1.0\nPlease retry in 33.384105706s.",
    "details": [
        {"@type": "type.googleapis.com/google.rpc.Help", "links": [
            {"description": "Learn more about Gemini API quotas",
             "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
            {"quotaMetric": "generativelanguage.googleapis.com/embed_content_free_tier_requests",
             "quotaId": "EmbedContentRequestsPerDayPerUserPerProjectPerModel-FreeTier",
             "quotaDimensions": {"location": "global", "model": "gemini-embedding-1.0"},
             "quotaValue": "1000"},
            {"quotaMetric": "generativelanguage.googleapis.com/embed_content_free_tier_requests",
             "quotaId": "EmbedContentRequestsPerMinutePerUserPerProjectPerModel-FreeTier",
             "quotaDimensions": {"location": "global", "model": "gemini-embedding-1.0"},
             "quotaValue": "100"},
            {"quotaMetric": "generativelanguage.googleapis.com/embed_content_free_tier_input_token_count",
             "quotaId": "EmbedContentInputTokensPerMinutePerUserPerProjectPerModel-FreeTier",
             "quotaDimensions": {"location": "global", "model": "gemini-embedding-1.0"},
             "quotaValue": "30000"}]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "33s"}]}}


def test_any_per_day_violation_stops_and_the_longer_delay_wins():
    with pytest.raises(QuotaExhausted) as err:
        _call_with(_mock(429, GOOGLE_429_PER_DAY))
    assert err.value.quota_id == "EmbedContentRequestsPerDayPerUserPerProjectPerModel-FreeTier"
    assert err.value.retry_after_s == pytest.approx(33.384105706)


def test_a_key_error_behind_a_gateway_without_details_is_still_an_access_error():
    body = {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                      "message": "API key expired. Please renew the API key."}}
    with pytest.raises(AccessError):
        _call_with(_mock(400, body))
    content = {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                         "message": "Unable to process input image."}}
    with pytest.raises(TerminalEmbedError):
        _call_with(_mock(400, content))


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


class _CountingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's own backend, noting the size each read asks for."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.asked: list[int] = []

    async def connect_tcp(self, *args, **kwargs) -> httpcore.AsyncNetworkStream:
        stream = await self.inner.connect_tcp(*args, **kwargs)
        backend = self

        class Counted(httpcore.AsyncNetworkStream):
            async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
                backend.asked.append(max_bytes)
                return await stream.read(max_bytes, timeout)

            async def write(self, buffer: bytes, timeout: float | None = None) -> None:
                await stream.write(buffer, timeout)

            async def aclose(self) -> None:
                await stream.aclose()

            def get_extra_info(self, info: str) -> object:
                return stream.get_extra_info(info)

        return Counted()


def test_an_answer_is_read_in_reads_of_a_megabyte(emulator: Emulator):
    """httpcore reads 64 KiB at a time unless told otherwise; the client tells it 1 MiB, so an
    answer of 100 vectors of 3,072 dimensions can come in a few reads, not dozens (how many
    depends on how the bytes arrive: only the size asked is checked)."""
    from pipeline.gemini.client import READ_BYTES
    backend = _CountingBackend()
    transport = httpx.AsyncHTTPTransport()
    transport._pool = httpcore.AsyncConnectionPool(network_backend=backend)

    async def call() -> int:
        async with GeminiClient(base_url=emulator.base_url, model="gemini-embedding-2",
                                dims=3072, api_key=KEY, transport=transport) as client:
            body = await client._post("batchEmbedContents",
                                      [_text(f"text {i} " * 50) for i in range(100)], False)
            assert len(client._decode(body, "embeddings", 100).vectors) == 100
            return len(body)

    size = anyio.run(call)
    assert size > 1_000_000
    assert backend.asked and set(backend.asked) == {READ_BYTES}
