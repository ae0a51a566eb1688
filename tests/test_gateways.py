"""Runs through the gateways most users call: the emulator playing a new-api / one-api gateway
(DMXAPI's raw key and VectorNode's bearer token), over HTTP, into real Lance tables."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import lancedb
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.emulator.gateway import GatewayOptions
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.errors import BalanceExhausted
from pipeline.outcome import EXIT_FAILED, EXIT_OK, EXIT_QUOTA
from pipeline.run import run_job
from tests.conftest import write_job

# The two styles of gateway users meet: DMXAPI (the bare key in Authorization, the -2 preview
# model) and VectorNode (Authorization: Bearer, gemini-embedding-001 with taskType); one
# flavour answers unrouted paths as new-api does (500 on the Batch create, HTML on uploads),
# the other with 404 everywhere.
STYLES = {
    "dmxapi": ({"auth": "raw", "model": "gemini-embedding-2-preview",
                "output_dimensionality": 768}, GatewayOptions(flavour="new-api", auth="raw")),
    "vectornode": ({"auth": "bearer", "model": "gemini-embedding-001", "output_dimensionality": 768,
                    "task_type": "RETRIEVAL_DOCUMENT"},
                   GatewayOptions(flavour="plain", auth="bearer")),
}
TOKEN = "sk-gateway-token-0123456789"


def _embed(emu: Emulator, **extra: Any) -> dict[str, Any]:
    return {"provider": "gemini", "api_key": TOKEN, "base_url": emu.base_url, "auth": "bearer",
            "model": "gemini-embedding-001", "output_dimensionality": 128, **extra}


def _gateway(**options: Any) -> Emulator:
    return Emulator(EmulatorOptions(), gateway=GatewayOptions(token=TOKEN, **options))


def _rows(tmp_path: Path, table: str = "vectors") -> list[dict[str, Any]]:
    db = lancedb.connect(str(tmp_path / "lance"))
    if table not in db.list_tables().tables:
        return []
    return db.open_table(table).to_arrow().drop_columns(["vector"] if table == "vectors"
                                                        else []).to_pylist()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("style", sorted(STYLES))
def test_a_backfill_through_a_gateway_embeds_every_item_once_interactively(tmp_path: Path,
                                                                           style: str):
    embed, gateway = STYLES[style]
    make_text_corpus(tmp_path / "src", 6_020)
    with Emulator(EmulatorOptions(), gateway=GatewayOptions(
            token=TOKEN, flavour=gateway.flavour, auth=gateway.auth)) as emu:
        job = write_job(tmp_path, tmp_path / "src", embed={  # embed.mode: auto, the default
            "provider": "gemini", "api_key": TOKEN, "base_url": emu.base_url, **embed})
        result = run_job(load_job(job))
        calls = dict(emu.gateway.calls)  # type: ignore[union-attr]
        assert result.exit_code == EXIT_OK, result.problems
        ids = [r["id"] for r in _rows(tmp_path)]
        assert len(ids) == len(set(ids)) == 6_020
        # one probe, nothing else: no Batch create, no upload
        assert calls.get("other", 0) + calls.get("async_batch", 0) <= 2, calls
        assert calls.get("async_batch", 0) == 0
        assert result.report["mode_used"] == "interactive"
        assert "does not serve the Batch API" in result.report["mode_why"]
        assert "404" in result.report["mode_why"]
        # The answer is remembered per base URL: the next large run asks nothing.
        make_text_corpus(tmp_path / "src" / "more", 30, seed=11)  # new contents
        again = run_job(load_job(job, overrides={("embed", "batch_min_items"): 10}))
        assert again.exit_code == EXIT_OK and again.stats.items_embedded == 30
        assert "remembered" in again.report["mode_why"]
        assert dict(emu.gateway.calls).get("other", 0) == calls.get("other", 0)  # type: ignore[union-attr]


def test_batch_mode_on_a_gateway_fails_before_any_work(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 20)
    with _gateway() as emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_embed(emu, mode="batch"))
        proc = _cli("run", "-q", str(job))
        assert emu.gateway.calls.get("embed", 0) == 0  # type: ignore[union-attr]
    assert proc.returncode == EXIT_FAILED
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not serve the Batch API" in lines[0], proc.stderr
    assert _rows(tmp_path) == [] and _rows(tmp_path, "files") == []


@pytest.mark.parametrize("body", ["sentence", "empty"])
def test_a_gateway_answering_only_429_is_backed_off_and_the_run_stops_with_exit_4(
        tmp_path: Path, body: str):
    # The bound (at most 40 calls in 10 minutes, the run ending at max_quota_wait_s)
    # scaled down 75 times: base 1/75 s, cap 60/75 s, 600/75 s of waiting.
    make_text_corpus(tmp_path / "src", 30)  # one batch
    with _gateway(rate_limit=1.0, rate_limit_body=body) as emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_embed(
            emu, max_quota_wait_s=8.0, backoff_base_s=1 / 75, backoff_cap_s=0.8))
        started = time.monotonic()
        run = run_job(load_job(job))
        took = time.monotonic() - started
        calls = emu.gateway.calls["embed"]  # type: ignore[union-attr]
    assert run.exit_code == EXIT_QUOTA
    assert 5 <= calls <= 40, calls
    assert took >= 7.5  # it waited its max_quota_wait_s out, it did not give up early
    assert run.stats.rejects == 0 and _rows(tmp_path, "rejects") == []
    assert run.stats.throttled_s == pytest.approx(8.0, abs=0.5)


def test_backoff_grows_per_consecutive_429_and_a_success_resets_it(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 30)
    with _gateway(rate_limit=0.5, seed=7) as emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_embed(
            emu, batch_size=1, concurrency=2, backoff_base_s=0.01, backoff_cap_s=0.2))
        run = run_job(load_job(job))
    assert run.exit_code == EXIT_OK and run.stats.items_embedded == 30
    assert run.stats.http_429 > 5
    assert run.stats.throttled_s < 0.2 * run.stats.http_429  # the cap, and resets


def test_an_exhausted_balance_stops_the_run_with_exit_4_keeping_what_was_done(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 300)
    with _gateway(balance_tokens=500) as emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_embed(emu, concurrency=1))
        started = time.monotonic()
        proc = _cli("run", "-q", str(job))
        took = time.monotonic() - started
    assert proc.returncode == EXIT_QUOTA, proc.stderr
    assert took < 10
    assert "balance is exhausted" in proc.stderr and "top it up" in proc.stderr
    assert TOKEN not in proc.stderr
    assert _rows(tmp_path, "rejects") == []
    assert 0 < len(_rows(tmp_path)) < 300  # the first batches are kept


def test_an_invalid_token_exits_3_with_a_gateway_hint(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 20)
    with _gateway() as emu:
        job = write_job(tmp_path, tmp_path / "src", embed={**_embed(emu),
                                                           "api_key": "sk-wrong-token-42"})
        started = time.monotonic()
        proc = _cli("run", "-q", str(job))
        assert time.monotonic() - started < 10
    assert proc.returncode == EXIT_FAILED
    assert "gateway token" in proc.stderr and "Generative Language API" not in proc.stderr
    assert "sk-wrong-token-42" not in proc.stderr
    assert _rows(tmp_path, "rejects") == []


def test_no_channel_for_the_model_exits_3_after_at_most_one_retry(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 20)
    with _gateway(no_channel=("gemini-embedding-001",)) as emu:
        run = run_job(load_job(write_job(tmp_path, tmp_path / "src", embed=_embed(emu))))
        assert emu.gateway.calls["embed"] <= 2  # type: ignore[union-attr]
    assert run.exit_code == EXIT_FAILED
    assert any("no channel serving model" in p for p in run.problems), run.problems


def _openai_endpoint(calls: list[str]) -> Starlette:
    async def embeddings(request: Request) -> Response:
        calls.append(request.url.path)
        return JSONResponse({"object": "list", "data": [{"object": "embedding", "index": 0,
                                                         "embedding": [0.1, 0.2]}],
                             "model": "text-embedding-3-small"})
    return Starlette(routes=[Route("/{rest:path}", embeddings, methods=["GET", "POST"])])


def test_a_wrong_shaped_200_is_a_configuration_error_after_one_call(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 20)
    calls: list[str] = []
    emu = Emulator(EmulatorOptions())
    emu.app = _openai_endpoint(calls)  # an OpenAI-compatible base URL, not a Gemini one
    with emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_embed(emu, mode="interactive"))
        run = run_job(load_job(job))
    assert run.exit_code == EXIT_FAILED
    assert len(calls) == 1
    assert any("OpenAI-style embeddings response" in p for p in run.problems), run.problems
    assert _rows(tmp_path, "rejects") == []


def _answer(status: int, body: bytes | dict[str, Any], **headers: str) -> httpx.MockTransport:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.MockTransport(lambda request: httpx.Response(status, content=content,
                                                              headers=headers))


def _one_call(transport: httpx.MockTransport, key: str = TOKEN) -> Exception:
    """The error one call through ``transport`` raises."""
    import anyio

    from pipeline.gemini.client import EmbedRequest, GeminiClient
    from pipeline.records import Part

    async def call() -> None:
        async with GeminiClient(base_url="https://gw.example", model="gemini-embedding-001",
                                dims=4, api_key=key, auth="bearer", transport=transport) as c:
            await c.embed(EmbedRequest((Part(text="x"),)))

    with pytest.raises(Exception) as info:
        anyio.run(call)
    return info.value


def _openai(message: str, type_: str = "new_api_error", code: str | int = "") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": "", "code": code}}


def test_gateway_error_bodies_are_read_in_their_own_words():
    from pipeline.errors import AccessError, QuotaExhausted, TransientEmbedError

    # Google's 429 rewritten by new-api: only the message says when, and whether per day.
    minute = _one_call(_answer(429, _openai(
        "Quota exceeded for metric: requests per minute (100). Please retry in 37.5s.",
        "upstream_error", 429)))
    assert type(minute) is TransientEmbedError and minute.retry_after_s == 37.5
    day = _one_call(_answer(429, _openai(
        "Quota exceeded for metric: generativelanguage.googleapis.com/embed_content_requests_"
        "per_day. Please retry in 3600s.", "upstream_error", 429)))
    assert isinstance(day, QuotaExhausted) and not isinstance(day, BalanceExhausted)
    # A balance used up: by code, by HTTP 402, by an older version's sentence.
    for status, body in ((403, _openai("用户额度不足, 剩余额度: ＄0.000000",  # noqa: RUF001
                                       code="insufficient_user_quota")),
                         (402, _openai("payment required")),
                         (401, _openai("该令牌额度已用尽"))):
        assert isinstance(_one_call(_answer(status, body)), BalanceExhausted)
    # Its own rate limit: a plain 429, no delay to read.
    plain = _one_call(_answer(429, b""))
    assert type(plain) is TransientEmbedError and plain.retry_after_s is None
    # An nginx page is its title, not 2 KB of HTML.
    page = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 2000 + b"</body>"
    bad = _one_call(_answer(502, page))
    assert isinstance(bad, TransientEmbedError) and "502 Bad Gateway" in str(bad)
    assert len(str(bad)) < 120
    # An invalid token echoed back is scrubbed; the hint is the gateway's.
    token = _one_call(_answer(401, _openai(f"Invalid token {TOKEN} (request id: 1)")))
    assert isinstance(token, AccessError) and TOKEN not in str(token)
    assert "gateway token" in str(token) and "Generative Language" not in str(token)


def test_an_html_200_is_an_endpoint_mismatch():
    from pipeline.errors import EndpointMismatch

    exc = _one_call(_answer(200, b"<!doctype html><title>New API</title>"))
    assert isinstance(exc, EndpointMismatch) and "HTML page (New API)" in str(exc)


def _check(job: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    proc = _cli("check", str(job), "--json", *extra)
    return proc.returncode, json.loads(proc.stdout or "{}")


def _finding(report: dict[str, Any], what: str) -> dict[str, Any]:
    return next(f for f in report["findings"] if f["what"] == what)


def test_check_reports_each_finding_against_the_emulator(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 2)
    with _gateway(auth="raw", kept_fields=("model", "content", "taskType", "title")) as raw, \
            Emulator(EmulatorOptions(api_key=TOKEN)) as google:
        gw = write_job(tmp_path / "gw", tmp_path / "src", embed=_embed(raw, auth="raw"))
        code, report = _check(gw)  # this gateway drops outputDimensionality
        assert code == EXIT_FAILED and not _finding(report, "dimensions")["ok"]
        assert "3072" in _finding(report, "dimensions")["detail"]
        code, report = _check(gw, "--set", "embed.output_dimensionality=3072")
        assert code == EXIT_OK, report
        assert _finding(report, "key")["ok"] and _finding(report, "latency")["ok"]
        batch = _finding(report, "batch_api")
        assert batch["ok"] and batch["detail"].startswith("not served")
        code, report = _check(gw, "--set", "embed.auth=bearer")
        assert code == EXIT_FAILED and "set embed.auth: raw" in _finding(report, "auth")["detail"]
        code, report = _check(gw, "--set", "embed.api_key=sk-not-this-one")
        assert code == EXIT_FAILED and not _finding(report, "key")["ok"]
        assert "sk-not-this-one" not in json.dumps(report)

        direct = write_job(tmp_path / "g", tmp_path / "src", embed=_embed(google, auth="google"))
        code, report = _check(direct)
        assert code == EXIT_OK and _finding(report, "batch_api")["detail"].startswith("served")
        code, report = _check(direct, "--set", "embed.model=gemini-embedding-9")
        assert code == EXIT_FAILED and not _finding(report, "model")["ok"]
        code, report = _check(direct, "--set", "embed.mode=batch", "--set",
                              "embed.batch_api=no")
        assert code == EXIT_FAILED and not _finding(report, "batch_api")["ok"]
