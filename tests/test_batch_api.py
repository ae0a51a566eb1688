"""The Batch API client against the emulator over HTTP: file and inline jobs, results matched
by key and equal to what embedContent returns, injected failures, cancel, list, delete."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import numpy as np
import orjson
import pytest

from pipeline.emulator import files as emulator_files
from pipeline.emulator.files import StoredFile
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.errors import AccessError, TerminalEmbedError
from pipeline.gemini import batches
from pipeline.gemini.batches import BatchApi, BatchJob, JobInput
from pipeline.gemini.client import EmbedRequest, GeminiClient
from pipeline.records import Part

T = TypeVar("T")
TEXTS = [f"note {i} about {'pasta' if i % 2 else 'stars'} and harbours" for i in range(250)]


def _with_api(emu: Emulator, fn: Callable[[BatchApi, GeminiClient], Awaitable[T]],
              key: str | None = "k") -> T:
    async def main() -> T:
        async with GeminiClient(base_url=emu.base_url, model="gemini-embedding-2", dims=128,
                                api_key=key) as client:
            return await fn(BatchApi(client), client)
    return anyio.run(main)


async def _wait(api: BatchApi, job: BatchJob) -> BatchJob:
    for _ in range(200):
        job = await api.get(job.name)
        if job.done:
            return job
        await anyio.sleep(0.05)
    raise AssertionError(f"{job.name} never finished: {job.state}")


def _request(text: str) -> EmbedRequest:
    return EmbedRequest((Part(text=text),), task_type="RETRIEVAL_DOCUMENT")


async def _file_job(api: BatchApi, display_name: str, texts: list[str] = TEXTS) -> BatchJob:
    """A file job of ``texts`` (keys ``id-{i}``), submitted and waited for."""
    lines = JobInput()
    for i, t in enumerate(texts):
        lines.add(*api.entry(f"id-{i}", _request(t)))
    name = await api.upload(lines, display_name=display_name)
    return await _wait(api, await api.create(display_name=display_name, file_name=name))


def test_a_file_job_returns_every_vector_by_key_as_embedcontent_would():
    async def flow(api: BatchApi, client: GeminiClient) -> dict[str, Any]:
        job = await _file_job(api, "run-1-0")
        results = {key: r async for key, r in api.results(job)}
        direct = await client.embed(_request(TEXTS[7]))
        return {"job": job, "results": results, "direct": direct.vectors[0]}

    with Emulator(EmulatorOptions(batch_delay_s=0.2)) as emu:
        out = _with_api(emu, flow)
        assert emu.state.stats.batch_items == 250 and emu.state.stats.items == 1
    job, results = out["job"], out["results"]
    assert job.state == "BATCH_STATE_SUCCEEDED" and job.succeeded == 250
    assert sorted(results) == sorted(f"id-{i}" for i in range(250))
    assert all(r.values is not None and r.values.shape == (128,) for r in results.values())
    assert np.allclose(results["id-7"].values, out["direct"], atol=1e-6)


def test_a_job_input_spooled_to_disk_is_uploaded_a_chunk_at_a_time(
        monkeypatch: pytest.MonkeyPatch):
    """A job's lines go to a temporary file beyond spool_bytes and are read from it as they are
    uploaded; what the service gets is what the lines say, and each result line read straight
    into numpy equals the same line read the slow way."""
    monkeypatch.setattr(batches, "UPLOAD_CHUNK", 4096)

    async def flow(api: BatchApi, client: GeminiClient) -> dict[str, Any]:
        lines = JobInput(spool_bytes=2048)
        for i, t in enumerate(TEXTS):
            lines.add(*api.entry(f"id-{i}", _request(t)))
        assert lines.count == 250 and lines.size > 10 * 4096
        assert lines.entries()[3] == api.entry("id-3", _request(TEXTS[3]))
        name = await api.upload(lines, display_name="spooled")
        lines.close()
        job = await _wait(api, await api.create(display_name="spooled", file_name=name))
        raw = [line async for line in client.stream_lines(
            f"{job.responses_file}:download", params={"alt": "media"}) if line.strip()]
        return {"results": {key: r async for key, r in api.results(job)},
                "slow": dict(api._result_of(orjson.loads(line)) for line in raw)}

    with Emulator(EmulatorOptions(batch_delay_s=0.1)) as emu:
        out = _with_api(emu, flow)
        assert emu.state.stats.batch_items == 250
    results, slow = out["results"], out["slow"]
    assert sorted(results) == sorted(slow) == sorted(f"id-{i}" for i in range(250))
    for key, result in results.items():
        assert result.values is not None and result.values.dtype == np.float32
        assert np.array_equal(result.values, slow[key].values)


def test_the_emulator_sends_a_download_at_a_links_pace(monkeypatch: pytest.MonkeyPatch):
    """``download_mb_per_s``: a job's responses file comes in, a chunk at a time, no faster
    than the link allows, and whole (every result)."""
    monkeypatch.setattr(emulator_files, "DOWNLOAD_CHUNK", 16_384)

    async def flow(api: BatchApi, client: GeminiClient) -> dict[str, Any]:
        job = await _file_job(api, "slow-down")
        started = anyio.current_time()
        results = {key: r async for key, r in api.results(job)}
        return {"results": results, "took": anyio.current_time() - started,
                "file": job.responses_file}

    with Emulator(EmulatorOptions(batch_delay_s=0.1, download_mb_per_s=0.4)) as emu:
        out = _with_api(emu, flow)
        size = len(emu.state.files.get(out["file"]).data)
    assert size > 10 * 16_384  # 250 vectors of 128 dimensions
    assert out["took"] >= size / 0.4e6 * 0.99
    assert sorted(out["results"]) == sorted(f"id-{i}" for i in range(250))


def test_inline_jobs_carry_their_keys_in_metadata_and_failures_come_back_per_request():
    async def flow(api: BatchApi, client: GeminiClient) -> dict[str, Any]:
        inline = [api.entry(f"k{i}", _request(t)) for i, t in enumerate(TEXTS[:40])]
        job = await _wait(api, await api.create(display_name="inline", inline=inline))
        return {key: r async for key, r in api.results(job)}

    with Emulator(EmulatorOptions(batch_delay_s=0.1, batch_error_rate=0.25, seed=3)) as emu:
        results = _with_api(emu, flow)
    assert sorted(results) == sorted(f"k{i}" for i in range(40))
    failed = [r for r in results.values() if r.error is not None]
    assert 3 <= len(failed) <= 20 and all(r.error["code"] == 503 for r in failed)  # type: ignore[index]
    assert all(r.values is not None for r in results.values() if r.error is None)


@pytest.mark.parametrize(("outcome", "state"), [("fail", "BATCH_STATE_FAILED"),
                                                ("expire", "BATCH_STATE_EXPIRED")])
def test_a_job_that_fails_or_expires_has_no_results(outcome: str, state: str):
    async def flow(api: BatchApi, client: GeminiClient) -> tuple[BatchJob, int]:
        job = await _wait(api, await api.create(display_name="x",
                                                inline=[api.entry("a", _request("a"))]))
        return job, len([r async for r in api.results(job)])

    with Emulator(EmulatorOptions(batch_delay_s=0.1, batch_outcome=outcome)) as emu:  # type: ignore[arg-type]
        job, count = _with_api(emu, flow)
    assert job.state == state and job.done and count == 0


def test_cancel_list_and_delete():
    async def flow(api: BatchApi, client: GeminiClient) -> tuple[BatchJob, list[str], list[str]]:
        job = await api.create(display_name="slow", inline=[api.entry("a", _request("a"))])
        await api.cancel(job.name)
        cancelled = await api.get(job.name)
        listed = [j.name for j in await api.list()]
        await api.delete(job.name)
        return cancelled, listed, [j.name for j in await api.list()]

    with Emulator(EmulatorOptions(batch_delay_s=30)) as emu:
        cancelled, listed, after = _with_api(emu, flow)
    assert cancelled.state == "BATCH_STATE_CANCELLED"
    assert listed == [cancelled.name] and after == []


def test_a_wrong_key_and_an_oversized_file_are_refused():
    async def upload(api: BatchApi, client: GeminiClient) -> str:
        lines = JobInput()
        lines.add("big", {"content": {"parts": [{"text": "x" * 5000}]}})  # over 4,096 bytes
        return await api.upload(lines, display_name="big")

    with Emulator(EmulatorOptions(api_key="right", max_file_bytes=4096)) as emu:
        with pytest.raises(AccessError):
            _with_api(emu, upload, key="wrong")
        with pytest.raises(TerminalEmbedError, match="maximum size"):
            _with_api(emu, upload, key="right")


def test_results_read_a_block_of_lines_at_a_time_keep_their_order_and_values(
        monkeypatch: pytest.MonkeyPatch):
    """Lines of the usual shape are made float32 and checked a block at a time (here blocks of
    3); an error line, a value float32 cannot hold and the end of the file each cut a block,
    and every result still comes in the file's order with the values the file holds."""
    monkeypatch.setattr(batches._Block, "VALUES", 3 * 128)

    async def flow(api: BatchApi, client: GeminiClient) -> tuple[list[tuple[str, Any]], list]:
        job = await _file_job(api, "blocks", TEXTS[:11])
        assert job.responses_file is not None
        stored = emu.state.files.files[job.responses_file]
        rows = [orjson.loads(line) for line in bytes(stored.data).splitlines()]
        rows[4] = {"key": rows[4]["key"], "error": {"code": 400, "message": "no"}}
        rows[8]["response"]["embedding"]["values"][0] = 1e39
        stored.data = bytearray(b"".join(orjson.dumps(r) + b"\n" for r in rows))
        return [item async for item in api.results(job)], rows

    with Emulator(EmulatorOptions(batch_delay_s=0)) as emu:
        got, rows = _with_api(emu, flow)
    assert [key for key, _ in got] == [row["key"] for row in rows]
    for (_, result), row in zip(got, rows, strict=True):
        if row is rows[4] or row is rows[8]:
            assert result.values is None and result.error is not None
        else:
            want = np.asarray(row["response"]["embedding"]["values"], dtype=np.float32)
            assert result.values is not None and result.values.tobytes() == want.tobytes()
    assert got[4][1].error["code"] == 400 and "NaN or infinity" in got[8][1].error["message"]


async def _three_text_job(api: BatchApi, emu: Emulator) -> tuple[BatchJob, StoredFile]:
    """A finished file job of three texts (keys id-0..id-2), and its responses file as the
    emulator stores it (to be corrupted)."""
    job = await _file_job(api, "x", TEXTS[:3])
    assert job.responses_file is not None
    return job, emu.state.files.files[job.responses_file]


@pytest.mark.parametrize("garbage", [b"[1, 2]", b'"a string"', b"7", b"{not json"])
def test_a_responses_line_that_is_no_result_is_a_bad_response_not_a_crash(garbage: bytes):
    """A responses file with a line that is no JSON object (a proxy's page, a file cut short)
    fails as the service's fault, TerminalEmbedError, which leaves the job pending for the next
    run, after the good lines before it."""
    async def flow(api: BatchApi, client: GeminiClient) -> list[str]:
        job, stored = await _three_text_job(api, emu)
        stored.data = stored.data.split(b"\n", 1)[0] + b"\n" + garbage + b"\n"
        got: list[str] = []
        with pytest.raises(TerminalEmbedError, match=r"not JSON|not a result"):
            async for key, _ in api.results(job):
                got.append(key)
        return got

    with Emulator(EmulatorOptions(batch_delay_s=0)) as emu:
        assert _with_api(emu, flow) == ["id-0"]


@pytest.mark.parametrize(("values", "why"), [
    ([0.5] * 127, "127 dimensions"), (["NaN"] + [0.5] * 127, "NaN or infinity"),
    ([1e39] + [0.5] * 127, "NaN or infinity"), ("0.5", "not a list")])
def test_a_result_whose_vector_is_no_vector_is_that_requests_error(values: Any, why: str):
    """A well-formed line whose vector is not one (the wrong size, values no float32 holds,
    no list) is the error of that request alone: the job's other results come, and the job is
    not left pending for a next run that would download the same line again."""
    async def flow(api: BatchApi, client: GeminiClient) -> dict[str, Any]:
        job, stored = await _three_text_job(api, emu)
        rows = [orjson.loads(line) for line in bytes(stored.data).splitlines()]
        rows[1]["response"]["embedding"]["values"] = values
        stored.data = bytearray(b"".join(orjson.dumps(r) + b"\n" for r in rows))
        return {key: r async for key, r in api.results(job)}

    with Emulator(EmulatorOptions(batch_delay_s=0)) as emu:
        results = _with_api(emu, flow)
    assert sorted(results) == ["id-0", "id-1", "id-2"]
    assert results["id-0"].values is not None and results["id-2"].values is not None
    bad = results["id-1"]
    assert bad.values is None and bad.error is not None
    assert bad.error["status"] == "BAD_RESPONSE" and why in bad.error["message"]
