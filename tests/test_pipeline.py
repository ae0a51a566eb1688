"""End to end: a folder of real files -> emulator over HTTP -> a Lance table in tmp_path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lancedb
import numpy as np
import polars as pl
import pytest

from pipeline.config import load_job
from pipeline.emulator.server import Emulator
from pipeline.run import EXIT_OK, run_job
from tests.conftest import copy_corpus_files, write_job

MIXED = ["pdf/tracemonkey.pdf", "pdf/minimal-document.pdf", "image/smile.png",
         "image/flower.jpg", "bad/this-is-a-jpeg.png", "bad/broken.png", "bad/rc4-40.pdf",
         "bad/empty.pdf"]


@pytest.fixture()
def mixed(tmp_path: Path, corpus_dir: Path) -> Path:
    src = tmp_path / "src"
    copy_corpus_files(corpus_dir, MIXED, src)
    (src / "notes").mkdir()
    (src / "notes" / "pasta.txt").write_text(
        "How to cook pasta: boil salted water and cook the spaghetti for nine minutes.")
    (src / "notes" / "stars.md").write_text(
        "Telescopes gather starlight; a bigger mirror shows fainter galaxies.")
    return src


def _tables(job_path: Path, env: dict[str, str] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    job = load_job(job_path, env)
    db = lancedb.connect(job.sink.uri)
    vectors = pl.from_arrow(db.open_table("vectors").to_arrow())
    rejects = pl.from_arrow(db.open_table("rejects").to_arrow())
    assert isinstance(vectors, pl.DataFrame) and isinstance(rejects, pl.DataFrame)
    return vectors, rejects


def test_end_to_end_mixed_folder(tmp_path: Path, mixed: Path):
    job_path = write_job(tmp_path, mixed)
    result = run_job(load_job(job_path))
    assert result.exit_code == EXIT_OK
    vectors, rejects = _tables(job_path)
    # tracemonkey: 14 pages -> 3 parts; 4 images/pdf singles; 2 texts
    assert vectors.height == 3 + 1 + 3 + 2 == result.stats.items_embedded
    assert vectors["id"].n_unique() == vectors.height
    assert sorted(rejects["key"].to_list()) == ["bad/broken.png", "bad/empty.pdf",
                                                 "bad/rc4-40.pdf"]
    assert dict(zip(rejects["key"], rejects["reason"], strict=True)) == {
        "bad/broken.png": "corrupt", "bad/empty.pdf": "empty", "bad/rc4-40.pdf": "encrypted"}
    trace = vectors.filter(pl.col("key") == "pdf/tracemonkey.pdf").sort("part")
    assert trace.select("page_start", "page_end").rows() == [(1, 6), (7, 12), (13, 14)]
    assert set(vectors["modality"]) == {"document", "image", "text"}
    assert vectors.filter(pl.col("key") == "bad/this-is-a-jpeg.png")["mime"].item() == "image/jpeg"
    v = np.stack(vectors["vector"].to_list())
    assert v.shape == (9, 256) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-3)
    assert (vectors["tokens"] > 0).all() and vectors["run_id"].n_unique() == 1
    # every listed file is accounted for: a row or a reject
    files = {str(p.relative_to(mixed)) for p in mixed.rglob("*") if p.is_file()}
    assert set(vectors["key"]) | set(rejects["key"]) == files

    again = run_job(load_job(job_path))
    assert again.exit_code == EXIT_OK
    assert again.stats.api_calls == 0 and again.stats.files_unchanged == len(files)
    assert _tables(job_path)[0].height == vectors.height


def test_changed_deleted_added_and_touched_files(tmp_path: Path, mixed: Path):
    job_path = write_job(tmp_path, mixed)
    run_job(load_job(job_path))
    before, _ = _tables(job_path)
    (mixed / "notes" / "pasta.txt").write_text("Risotto needs constant stirring and warm stock.")
    (mixed / "notes" / "stars.md").unlink()
    (mixed / "notes" / "new.txt").write_text("A brand new note about volcanoes.")
    os.utime(mixed / "image/flower.jpg", (1, 1))  # touched, same content
    result = run_job(load_job(job_path))
    s = result.stats
    assert (s.files_changed, s.files_new, s.files_deleted) == (1, 1, 1)
    assert s.items_embedded == 2 and s.files_unchanged == len(MIXED) - 1 + 1
    after, _ = _tables(job_path)
    assert "notes/stars.md" not in set(after["key"])
    pasta = after.filter(pl.col("key") == "notes/pasta.txt")
    assert pasta.height == 1 and "Risotto" in pasta["text"].item()
    assert after.height == before.height + 1 - 1
    third = run_job(load_job(job_path))
    assert third.stats.api_calls == 0 and third.stats.files_unchanged == third.stats.files_seen


def test_gemini_provider_against_an_external_emulator(tmp_path: Path, mixed: Path,
                                                      emulator: Emulator,
                                                      monkeypatch: pytest.MonkeyPatch):
    shutil.rmtree(mixed / "pdf")
    job_path = write_job(tmp_path, mixed, embed={
        "provider": "gemini", "base_url": emulator.base_url, "api_key": "${EP_TEST_KEY}",
        "auth": "bearer", "model": "gemini-embedding-2", "output_dimensionality": 128})
    before = emulator.state.stats.items
    monkeypatch.setenv("EP_TEST_KEY", "k-123")
    result = run_job(load_job(job_path))
    assert emulator.state.stats.items - before == result.stats.items_embedded == 5
    vectors, rejects = _tables(job_path)
    for frame in (vectors.drop("vector"), rejects):
        assert not any("k-123" in str(v) for row in frame.rows() for v in row)


def test_cli_run_and_search_rank_the_relevant_text_first(tmp_path: Path, mixed: Path):
    job_path = write_job(tmp_path, mixed)
    env = {**os.environ, "COLUMNS": "200"}
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job_path)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == EXIT_OK, run.stderr
    assert "items embedded" in run.stderr and "rejected encrypted" in run.stderr
    search = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", str(job_path),
                             "how long to cook spaghetti", "-k", "3"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert search.returncode == 0, search.stderr
    lines = [ln for ln in search.stdout.splitlines() if ln.startswith("│")]
    assert "notes/pasta.txt" in lines[0]


def test_whole_corpus_end_to_end_zero_400s(tmp_path: Path, corpus_dir: Path, emulator: Emulator):
    """Every corpus file ends as rows or exactly one reject; the emulator, which enforces the
    model's limits, answers no 400: the validator fitted everything before sending."""
    from tests.conftest import load_manifest
    from tests.test_validate import MANIFEST_POLICY

    job_path = write_job(tmp_path, corpus_dir, embed={
        "provider": "gemini", "api_key": "any-key",
        "base_url": emulator.base_url, "model": "gemini-embedding-2",
        "output_dimensionality": 128, "concurrency": 4}, extra={
        "validate": MANIFEST_POLICY, "source": {"kind": "local", "root": str(corpus_dir),
                                               "exclude": ["*.md", "*.tsv"]}})
    before = dict(emulator.state.stats.by_status)
    result = run_job(load_job(job_path))
    after = emulator.state.stats.by_status
    assert after.get("400", 0) == before.get("400", 0), "the emulator refused a request"
    vectors, rejects = _tables(job_path)
    assert vectors["id"].n_unique() == vectors.height
    rows = load_manifest()
    whole_file_rejects = rejects.filter(pl.col("part").is_null())
    assert whole_file_rejects["key"].n_unique() == whole_file_rejects.height
    by_key = dict(zip(whole_file_rejects["key"], whole_file_rejects["reason"], strict=True))
    parts = vectors.group_by("key").agg(pl.len().alias("n"), pl.col("page_end").max())
    counts = dict(zip(parts["key"], parts["n"], strict=True))
    assert set(counts) | set(by_key) == {r.path for r in rows}
    assert not set(counts) & set(by_key)
    for row in rows:
        got = by_key.get(row.path) or ("split" if counts[row.path] > 1 else "ok")
        if row.expected == "too_long" and got == "split":
            got = "too_long"
        assert row.accepts(got), f"{row.path}: {got}"
        if row.pages and row.path in counts:
            page_end = parts.filter(pl.col("key") == row.path)["page_end"].item()
            assert page_end == row.pages, row.path
    assert result.stats.files_seen == len(rows)


def test_a_validator_step_that_hangs_becomes_a_timeout_reject(tmp_path: Path, mixed: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    """The watchdog, for code that never returns to check its deadline (a stuck parser)."""
    import time

    from pipeline.validate import Validator

    real_fit = Validator.fit

    def fit(self, obj, data, extras=None, deadline=None):  # type: ignore[no-untyped-def]
        if obj.key.endswith("stars.md"):
            time.sleep(10)
        yield from real_fit(self, obj, data, extras, deadline)

    monkeypatch.setattr(Validator, "fit", fit)
    # 2 s (a 4 s deadline): the real 14-page PDF beside it must not time out on a loaded machine
    job_path = write_job(tmp_path, mixed, extra={"validate": {"file_timeout_s": 2.0}})
    started = time.monotonic()
    result = run_job(load_job(job_path))
    assert time.monotonic() - started < 10
    _, rejects = _tables(job_path)
    stars = rejects.filter(pl.col("key") == "notes/stars.md")
    assert stars["reason"].to_list() == ["timeout"]
    assert (result.stats.items_embedded, result.stats.rejects) == (8, 4), \
        rejects.select("key", "reason", "message").rows()


def test_per_file_limit_stops_a_long_split(tmp_path: Path, corpus_dir: Path):
    src = tmp_path / "src"
    copy_corpus_files(corpus_dir, ["pdf/octave.pdf"], src)
    job_path = write_job(tmp_path, src, extra={"validate": {"file_timeout_s": 0.3}})
    result = run_job(load_job(job_path))
    vectors, rejects = _tables(job_path)
    assert rejects["reason"].to_list() == ["timeout"]
    assert "validate.file_timeout_s" in rejects["message"].item()
    assert (rejects["part"].item() or 0) == vectors.height  # parts before the limit are kept
    assert result.stats.files_done == 1
