"""Batch API mode, exactly: results adopted only where they answer what would be sent now, a
job collected only once its rows are committed, no paid job left orphaned. Real runs (in process
and as CLI processes killed with SIGKILL) against the emulator's Batch API, real Lance tables."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pytest

from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.outcome import EXIT_OK, EXIT_PENDING
from pipeline.run import run_job
from tests.conftest import write_job

FAST_POLL = {"poll_initial_s": 0.1, "poll_max_s": 0.3}
TEMPLATE = "doc: {title} -- {text}"


def _embed(emu: Emulator, **extra: Any) -> dict[str, Any]:
    return {"provider": "gemini", "api_key": "k", "base_url": emu.base_url,
            "model": "gemini-embedding-2", "output_dimensionality": 128, "mode": "batch",
            "batch": FAST_POLL, **extra}


def _cli(job: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-q", *args, str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _vectors(folder: Path) -> dict[str, np.ndarray]:
    table = lancedb.connect(str(folder / "lance")).open_table("vectors").to_arrow()
    return dict(zip(table["id"].to_pylist(), table["vector"].to_numpy(zero_copy_only=False),
                    strict=True))


def _batches(job: Path) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "batches", "--json", str(job)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_OK, done.stderr
    return list(json.loads(done.stdout))


@pytest.mark.parametrize("change", [
    {"embed": {"document_template": TEMPLATE}},
    {"validate": {"text_max_tokens": 24, "text_overlap_tokens": 0}},
], ids=["template", "chunking"])
def test_results_of_other_requests_are_never_adopted(tmp_path: Path, change: dict[str, Any]):
    make_text_corpus(tmp_path / "src", 60, words=30)
    with Emulator(EmulatorOptions(batch_delay_s=0.5)) as emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_embed(emu))
        detached = _cli(job, "--detach")
        assert detached.wait(timeout=120) == EXIT_PENDING, detached.communicate()
        overrides = {(section, key): value for section, keys in change.items()
                     for key, value in keys.items()}
        collected = run_job(load_job(job, overrides=overrides))
        assert collected.exit_code == EXIT_OK, collected.problems
        assert collected.stats.items_stale_results > 0
        # the same settings, interactively, in a table of its own: the truth to compare with
        truth = run_job(load_job(write_job(tmp_path / "truth", tmp_path / "src", embed=_embed(
            emu, mode="interactive")), overrides=overrides))
        assert truth.exit_code == EXIT_OK
        rows = _batches(job)
    got, want = _vectors(tmp_path), _vectors(tmp_path / "truth")
    assert set(got) == set(want)
    for item_id, vector in want.items():
        assert np.allclose(got[item_id], vector, atol=1e-6), item_id
    first = next(r for r in rows if r["run_id"] != collected.stats.run_id)
    assert first["status"] == "superseded"  # its results answer requests no one sends now
    assert collected.stats.items_superseded == first["items"]


@pytest.mark.slow
def test_a_kill_at_any_moment_of_collection_pays_nothing_twice(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 300)
    with Emulator(EmulatorOptions(batch_delay_s=3.0)) as emu:
        # a writer that commits only at the end: everything collected waits for it
        job = write_job(tmp_path, tmp_path / "src", embed=_embed(
            emu, batch={**FAST_POLL, "max_requests": 15}),
            extra={"run": {"flush_rows": 100_000, "flush_interval_s": 60}})
        detached = _cli(job, "--detach")
        assert detached.wait(timeout=120) == EXIT_PENDING, detached.communicate()
        assert emu.state.stats.batch_jobs == 20
        time.sleep(3.5)  # every job done: collection is all that is left
        for fetched in (4, 8, 12):  # killed once 4, 8, 12 of the 20 jobs' results were fetched
            before = emu.state.stats.http_requests
            proc = _cli(job)
            deadline = time.monotonic() + 60
            while emu.state.stats.http_requests - before < fetched:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        final = _cli(job)
        assert final.wait(timeout=180) == EXIT_OK, final.communicate()
        assert emu.state.stats.batch_jobs == 20  # no job submitted again
        assert emu.state.stats.batch_items == 300
        assert emu.state.stats.items == 0  # nor anything embedded interactively
    ids = list(_vectors(tmp_path))
    assert len(ids) == len(set(ids)) == 300
    assert {r["status"] for r in _batches(job)} == {"collected"}


def test_switching_to_interactive_collects_what_was_paid_for(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 80)
    with Emulator(EmulatorOptions(batch_delay_s=0.3)) as emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_embed(emu))
        detached = _cli(job, "--detach")
        assert detached.wait(timeout=120) == EXIT_PENDING, detached.communicate()
        plan = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", "--json", str(job)],
                              capture_output=True, text=True, timeout=120)
        figures = json.loads(plan.stdout)
        # what the job holds is awaited, not priced again
        assert figures["items_awaited"] == 80 and figures["cost_usd"] == 0, figures
        time.sleep(0.5)
        result = run_job(load_job(job, overrides={("embed", "mode"): "interactive"}))
        assert result.exit_code == EXIT_OK, result.problems
        assert emu.state.stats.items == 0  # nothing embedded twice
        assert result.stats.items_batch == 80
        rows = _batches(job)
    assert len(_vectors(tmp_path)) == 80
    assert [r["status"] for r in rows] == ["collected"]
    assert not any(r.get("service_state") == "BATCH_STATE_RUNNING" for r in rows)
