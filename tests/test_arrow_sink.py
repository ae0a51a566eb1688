"""The Arrow sink: Parquet and IPC files that pyarrow, polars and duckdb read with no glue."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import lancedb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.errors import SinkError
from pipeline.run import EXIT_OK, run_job
from tests.conftest import copy_corpus_files, write_job

SAMPLE = ["pdf/tracemonkey.pdf", "image/smile.png", "audio/crunching.mp3", "bad/broken.png"]


def _source(tmp_path: Path, corpus_dir: Path) -> Path:
    src = tmp_path / "src"
    copy_corpus_files(corpus_dir, SAMPLE, src)
    make_text_corpus(src / "notes", 50)
    return src


def test_parquet_is_read_by_pyarrow_polars_and_duckdb_like_lance(tmp_path: Path,
                                                                corpus_dir: Path):
    src = _source(tmp_path, corpus_dir)
    arrow_job = write_job(tmp_path / "a", src, extra={
        "sink": {"kind": "arrow", "path": str(tmp_path / "a" / "out")}})
    lance_job = write_job(tmp_path / "l", src)
    assert run_job(load_job(arrow_job)).exit_code == EXIT_OK
    run_job(load_job(lance_job))
    lance_rows = lancedb.connect(str(tmp_path / "l" / "lance")).open_table("vectors").count_rows()

    out = tmp_path / "a" / "out"
    table = ds.dataset(out, format="parquet").to_table()
    assert table.num_rows == lance_rows == 50 + 3 + 1 + 1
    vtype = table.schema.field("vector").type
    assert pa.types.is_fixed_size_list(vtype) and vtype.list_size == 256
    assert vtype.value_type == pa.float32()
    frame = pl.scan_parquet(out / "*.parquet").collect()
    assert frame.height == lance_rows and frame["id"].n_unique() == lance_rows
    count = duckdb.sql(f"SELECT count(*) FROM '{out}/*.parquet'").fetchall()
    assert count == [(lance_rows,)]
    rejects = pl.read_parquet(out / "_rejects" / "*.parquet")
    assert rejects["reason"].to_list() == ["corrupt"]
    assert not any(p.name.startswith(".tmp") for p in out.rglob("*"))
    vectors = np.stack(frame["vector"].to_list())
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)


def test_ipc_format_and_polars_scan_ipc(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 20)
    job = write_job(tmp_path, tmp_path / "src", extra={
        "sink": {"kind": "arrow", "path": str(tmp_path / "out"), "format": "ipc"}})
    assert run_job(load_job(job)).exit_code == EXIT_OK
    assert pl.scan_ipc(tmp_path / "out" / "*.arrow").collect().height == 20


def test_incremental_runs_and_search(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 30)
    job = write_job(tmp_path, tmp_path / "src", extra={
        "sink": {"kind": "arrow", "path": str(tmp_path / "out")}})
    run_job(load_job(job))
    assert run_job(load_job(job)).stats.api_calls == 0
    notes = sorted((tmp_path / "src").rglob("*.txt"))
    notes[0].write_text("Completely new words about volcanoes and lava.")
    notes[1].unlink()
    (tmp_path / "src" / "extra.txt").write_text("An extra note about comets.")
    third = run_job(load_job(job))
    assert (third.stats.files_changed, third.stats.files_deleted, third.stats.files_new) == (
        1, 1, 1)
    frame = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert frame.height == 30 and frame["id"].n_unique() == 30
    assert frame.filter(pl.col("uri") == notes[0].as_uri())["text"].item().startswith(
        "Completely")
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", str(job),
                          "volcanoes and lava", "-k", "2", "--where", "modality = 'text'"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    first = next(ln for ln in out.stdout.splitlines() if ln.startswith("│"))
    assert notes[0].name in first


def test_a_killed_runs_rows_are_not_written_twice(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    """A run that fails after writing some files but before recording them as done: the next
    run reads the ids back by run id and does not append them again."""
    from pipeline.state.manifest import Manifest

    make_text_corpus(tmp_path / "src", 40)
    job = write_job(tmp_path, tmp_path / "src", embed={
        "provider": "emulator", "model": "gemini-embedding-2", "output_dimensionality": 128,
        "batch_size": 10}, extra={"sink": {"kind": "arrow", "path": str(tmp_path / "out")},
                                  "run": {"flush_rows": 10}})
    real_record = Manifest.record
    calls = {"n": 0}

    def fails_after_two(self, states, run_id):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 2:
            raise SinkError("simulated: the state store went away")
        real_record(self, states, run_id)

    monkeypatch.setattr(Manifest, "record", fails_after_two)
    with pytest.raises(SinkError):
        run_job(load_job(job))
    monkeypatch.setattr(Manifest, "record", real_record)
    second = run_job(load_job(job))
    assert second.exit_code == EXIT_OK and second.stats.items_resumed > 0
    frame = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert frame.height == 40 and frame["id"].n_unique() == 40
