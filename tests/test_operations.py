"""Running it every night: the plan before, the report after, and never two runs at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.commands.planner import make_plan
from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.run import EXIT_OK, run_job
from pipeline.state.lock import LOCK_NAME, JobLock, JobLocked
from tests.conftest import copy_corpus_files, write_job

SAMPLE = ["pdf/tracemonkey.pdf", "pdf/pdflatex-4-pages.pdf", "image/smile.png",
          "image/rommel.jpg", "audio/crunching.mp3", "audio/asc-machine_wars.mp3",
          "video/chaplin.mp4", "video/one-by-one-person-detection.mp4", "bad/broken.png",
          "bad/example.gif"]


def test_plan_matches_the_run_and_calls_nothing(tmp_path: Path, corpus_dir: Path):
    src = tmp_path / "src"
    copy_corpus_files(corpus_dir, SAMPLE, src)
    make_text_corpus(src / "notes", 40, words=30)
    with Emulator() as emu:
        job = load_job(write_job(tmp_path, src, embed={
            "provider": "gemini", "api_key": "any-key",
            "base_url": emu.base_url, "model": "gemini-embedding-2",
            "output_dimensionality": 128}))
        plan = make_plan(job).as_dict(job)
        assert emu.state.stats.http_requests == 0
        result = run_job(job)
        reported = emu.state.stats.tokens_by_modality
    report = json.loads(next((tmp_path / "lance" / "reports").glob("*.json")).read_text())
    assert plan["files"] == {"new": len(SAMPLE) + 40, "deleted": 0}
    for modality, tokens in report["tokens_by_modality"].items():
        assert tokens > 0, modality
    assert sum(plan["items"].values()) == result.stats.items_embedded
    assert plan["rejects"] == dict(result.stats.reject_reasons)
    names = {"TEXT": "text", "IMAGE": "image", "DOCUMENT": "document", "AUDIO": "audio",
             "VIDEO": "video"}
    served = {names[k]: v for k, v in reported.items()}
    for modality, estimate in plan["tokens"].items():
        assert abs(estimate - served[modality]) <= 0.1 * served[modality], (modality, estimate,
                                                                           served[modality])
    assert set(plan["items"]) == {"text", "image", "document", "audio", "video"}
    again = make_plan(job).as_dict(job)
    assert again["files"] == {"unchanged": len(SAMPLE) + 40, "deleted": 0}
    assert again["items"] == {} and again["cost_usd"] == 0


def test_report_holds_what_operators_need(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 30)
    job_path = write_job(tmp_path, tmp_path / "src")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-q", "--report", "-",
                           str(job_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_OK, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("run_id", "exit_code", "files_new", "items_embedded", "reject_reasons",
                "tokens_by_modality", "cost_usd", "api_calls", "http_429", "retries",
                "latency_p50_s", "latency_p95_s", "wall_s"):
        assert key in report, key
    assert report["items_embedded"] == 30 and report["cost_usd"] > 0
    assert report["latency_p95_s"] >= report["latency_p50_s"] > 0
    beside = tmp_path / "lance" / "reports" / f"{report['run_id']}.json"
    assert json.loads(beside.read_text())["items_embedded"] == 30


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 400)
    with Emulator(EmulatorOptions(latency_ms=200)) as emu:
        job_path = write_job(tmp_path, tmp_path / "src", embed={
            "provider": "gemini", "api_key": "any-key",
            "base_url": emu.base_url, "model": "gemini-embedding-2",
            "output_dimensionality": 128, "batch_size": 10, "concurrency": 1})
        first = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-q",
                                  str(job_path)], stderr=subprocess.PIPE)
        lock = tmp_path / "lance" / LOCK_NAME
        deadline = time.monotonic() + 60
        while not lock.exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job_path)],
                                capture_output=True, text=True, timeout=60)
        _, first_err = first.communicate(timeout=120)
    assert second.returncode == 5
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) <= 2 and "is being written by run" in second.stderr
    assert first.returncode == EXIT_OK, first_err.decode()
    assert not lock.exists()


def test_a_stale_lock_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    make_text_corpus(tmp_path / "src", 5)
    job_path = write_job(tmp_path, tmp_path / "src")
    (tmp_path / "lance").mkdir()
    dead = {"run_id": "old-run", "job": "t", "host": socket.gethostname(), "pid": 999_999_999,
            "heartbeat": time.time()}
    (tmp_path / "lance" / LOCK_NAME).write_text(json.dumps(dead))
    result = run_job(load_job(job_path))
    assert result.exit_code == EXIT_OK and result.stats.items_embedded == 5
    assert "took over a stale lock of run old-run" in caplog.text
    old = {**dead, "host": "another-host", "pid": os.getpid(), "heartbeat": time.time() - 3600}
    (tmp_path / "lance" / LOCK_NAME).write_text(json.dumps(old))
    assert run_job(load_job(job_path)).exit_code == EXIT_OK


def test_lock_on_an_object_store_sink(object_server: Any):
    """Created only if absent on S3 and on Azure: a second run is refused, a released lock
    is taken again."""
    uri = f"{object_server.scheme}://sink/locked-out"

    def lock(run_id: str) -> JobLock:
        return JobLock(uri, run_id, "job", store=(object_server.store("sink"), "locked-out"))

    first = lock("run-a")
    first.acquire()
    with pytest.raises(JobLocked, match="run-a"):
        lock("run-b").acquire()
    first.release()
    third = lock("run-c")
    third.acquire()
    third.release()
