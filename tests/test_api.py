"""The Python API for orchestrators: ``from pipeline import load_job, plan_job, run_job``,
typed results (the JSON report's figures) and typed errors, never SystemExit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipeline
from pipeline.commands.sample_files import make_text_corpus
from tests.conftest import write_job


def test_plan_then_run_through_the_api(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 15)
    job = pipeline.load_job(write_job(tmp_path, tmp_path / "src",
                                      extra={"run": {"report": str(tmp_path / "r.json")}}),
                            overrides={("embed", "concurrency"): 3})
    assert job.embed.concurrency == 3
    figures = pipeline.plan_job(job)
    assert figures["files"]["new"] == 15 and figures["items"] == {"text": 15}
    result = pipeline.run_job(job)
    assert isinstance(result, pipeline.RunResult) and result.exit_code == 0
    on_disk = json.loads((tmp_path / "r.json").read_text())
    for key in ("items_embedded", "files_new", "tokens", "api_calls", "exit_code", "status"):
        assert result.report[key] == on_disk[key], key
    assert result.report["items_embedded"] == result.stats.items_embedded == 15
    history = pipeline.run_history(job)
    assert isinstance(history, pipeline.History) and len(history.runs) == 1
    (row,) = history.runs
    assert row["run_id"] == result.report["run_id"] and row["items_embedded"] == 15
    assert history.rejects == [] and history.rejects_total == 0


def test_the_api_raises_typed_errors_not_system_exit(tmp_path: Path):
    with pytest.raises(pipeline.ConfigError, match="job file not found"):
        pipeline.load_job(tmp_path / "missing.yaml")
    make_text_corpus(tmp_path / "src", 1)
    path = write_job(tmp_path, tmp_path / "src", embed={
        "provider": "gemini", "model": "gemini-embedding-2", "output_dimensionality": 128})
    job = pipeline.load_job(path, env={})
    with pytest.raises(pipeline.ConfigError, match="API key"):
        pipeline.run_job(job)
    with pytest.raises(pipeline.NotRunYet, match="no run history"):
        pipeline.run_history(job)
    with pytest.raises(AttributeError):
        pipeline.no_such_name  # noqa: B018


def test_importing_the_package_loads_no_heavy_module():
    import subprocess
    import sys

    code = ("import sys, pipeline; heavy = [m for m in ('lancedb', 'pyarrow', 'ray', 'pypdf') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
