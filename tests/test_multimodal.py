"""Aggregated items (media + caption), task-aware requests, unit vectors, metadata columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import lancedb
import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipeline.commands.lookup import search
from pipeline.config import load_job
from pipeline.emulator.server import Emulator
from pipeline.run import EXIT_OK, run_job
from tests.conftest import write_job

CAPTIONS = {
    "harbour": "fishing boats moored in a quiet harbour at dawn",
    "glacier": "a blue glacier calving into the arctic sea",
    "orchard": "apple trees in bloom in a spring orchard",
}


def _photos(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for name, caption in CAPTIONS.items():
        pixels = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.jpg", quality=90)
        (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
    (folder / "notes.txt").write_text("A plain note with no picture: tide tables for June.")


def _vectors(job: Path) -> pl.DataFrame:
    frame = pl.from_arrow(lancedb.connect(load_job(job).sink.uri).open_table("vectors").to_arrow())
    assert isinstance(frame, pl.DataFrame)
    return frame


def test_image_and_caption_make_one_row_and_a_caption_change_re_embeds(tmp_path: Path):
    _photos(tmp_path / "src")
    job = write_job(tmp_path, tmp_path / "src", extra={
        "source": {"kind": "local", "root": str(tmp_path / "src"), "sidecar": "{stem}.txt"}})
    first = run_job(load_job(job))
    assert first.exit_code == EXIT_OK
    rows = _vectors(job)
    assert sorted(rows["key"]) == ["glacier.jpg", "harbour.jpg", "notes.txt", "orchard.jpg"]
    harbour = rows.filter(pl.col("key") == "harbour.jpg")
    assert harbour["modality"].item() == "image" and harbour["text"].item() == CAPTIONS["harbour"]
    assert harbour["sidecar_uri"].item().endswith("/harbour.txt")
    assert rows.filter(pl.col("key") == "notes.txt")["sidecar_uri"].item() is None

    assert run_job(load_job(job)).stats.api_calls == 0
    (tmp_path / "src" / "glacier.txt").write_text("an ice field under the midnight sun, longer")
    again = run_job(load_job(job))
    assert again.stats.files_changed == 1 and again.stats.items_embedded == 1
    after = _vectors(job)
    assert after.height == 4
    assert after.filter(pl.col("key") == "glacier.jpg")["text"].item().startswith("an ice field")


def test_search_ranks_the_image_whose_caption_matches(tmp_path: Path):
    _photos(tmp_path / "src")
    job = write_job(tmp_path, tmp_path / "src", extra={
        "source": {"kind": "local", "root": str(tmp_path / "src"), "sidecar": "{stem}.txt"}})
    run_job(load_job(job))
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", str(job),
                          "--where", "modality = 'image'", "boats in the harbour", "-k", "3"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("│")]
    assert "harbour.jpg" in lines[0] and not any("notes.txt" in ln for ln in lines)
    by_file = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", str(job),
                              "--file", str(tmp_path / "src" / "orchard.jpg"), "-k", "1"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert by_file.returncode == 0, by_file.stderr
    first = next(ln for ln in by_file.stdout.splitlines() if ln.startswith("│"))
    assert "orchard.jpg" in first


@pytest.mark.parametrize("model", ["gemini-embedding-001", "gemini-embedding-2"])
def test_requests_carry_the_task_the_model_wants(tmp_path: Path, model: str):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tides.txt").write_text("Spring tides follow the full moon.")
    with Emulator() as emu:
        job = write_job(tmp_path, tmp_path / "src", embed={
            "provider": "gemini", "api_key": "any-key", "base_url": emu.base_url, "model": model,
            "output_dimensionality": 768})
        run_job(load_job(job))
        anyio.run(lambda: search(load_job(job), "when are tides high", k=1))
        logged = httpx.get(emu.base_url + "/emulator/requests").json()
    document = logged[0]["body"]["requests"][0] if "requests" in logged[0]["body"] else logged[0]["body"]
    query = logged[-1]["body"]
    doc_text = document["content"]["parts"][0]["text"]
    query_text = query["content"]["parts"][0]["text"]
    if model == "gemini-embedding-001":
        assert document["taskType"] == "RETRIEVAL_DOCUMENT" and document["title"] == "tides"
        assert doc_text == "Spring tides follow the full moon."
        assert query["taskType"] == "RETRIEVAL_QUERY" and query_text == "when are tides high"
    else:
        assert "taskType" not in document and "title" not in document
        assert doc_text == "title: tides | text: Spring tides follow the full moon."
        assert "taskType" not in query
        assert query_text == "task: search result | query: when are tides high"


def test_gemini_embedding_001_vectors_are_normalised(tmp_path: Path):
    from pipeline.commands.sample_files import make_text_corpus

    make_text_corpus(tmp_path / "src", 50)
    job = write_job(tmp_path, tmp_path / "src", embed={
        "provider": "emulator", "model": "gemini-embedding-001", "output_dimensionality": 768})
    run_job(load_job(job))
    vectors = np.stack(_vectors(job)["vector"].to_list())
    assert vectors.shape == (50, 768)
    assert np.all(np.abs(np.linalg.norm(vectors, axis=1) - 1) < 1e-3)


def test_metadata_file_gives_captions_titles_and_filterable_columns(tmp_path: Path):
    _photos(tmp_path / "src")
    for name in CAPTIONS:
        (tmp_path / "src" / f"{name}.txt").unlink()
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in [
        {"path": "harbour.jpg", "caption": CAPTIONS["harbour"], "year": 1998, "author": "ana"},
        {"path": "glacier.jpg", "caption": CAPTIONS["glacier"], "year": 2015, "author": "bo"},
        {"path": "orchard.jpg", "caption": CAPTIONS["orchard"], "year": "not a year"},
    ]))
    job = write_job(tmp_path, tmp_path / "src", extra={"source": {
        "kind": "local", "root": str(tmp_path / "src"),
        "metadata": {"path": str(meta), "caption": "caption",
                     "columns": {"year": "int64", "author": "string"}}}})
    assert run_job(load_job(job)).exit_code == EXIT_OK
    rows = _vectors(job)
    assert rows.schema["year"] == pl.Int64 and rows.schema["author"] == pl.String
    table = lancedb.connect(load_job(job).sink.uri).open_table("vectors")
    recent = table.search().where("year > 2000").select(["key"]).to_list()
    assert [r["key"] for r in recent] == ["glacier.jpg"]
    orchard = rows.filter(pl.col("key") == "orchard.jpg")
    assert orchard["year"].item() is None and orchard["text"].item() == CAPTIONS["orchard"]

    lines = meta.read_text().splitlines()
    lines[0] = json.dumps({"path": "harbour.jpg", "caption": "a storm over the harbour",
                           "year": 1999, "author": "ana"})
    meta.write_text("\n".join(lines))
    again = run_job(load_job(job))
    assert again.stats.files_changed == 1 and again.stats.items_embedded == 1
    assert _vectors(job).filter(pl.col("key") == "harbour.jpg")["year"].item() == 1999
