"""Content, not paths, is paid for: moved, renamed and duplicated files reuse the vectors of
their content (no call), a move is not a loss to the delete guard, jobs share vectors through
``embed.reuse_from``, and nothing that changes the output is ever reused. Real runs against
the emulator, real Lance tables."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from pipeline.commands.planner import make_plan
from pipeline.commands.sample_files import make_quickstart_media, make_text_corpus
from pipeline.config import load_job
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.errors import SinkError
from pipeline.outcome import EXIT_OK
from pipeline.run import RunResult, run_job
from tests.conftest import write_job

EMBED = {"provider": "emulator", "model": "gemini-embedding-2", "output_dimensionality": 128}


def _run(folder: Path, src: Path, **embed: Any) -> RunResult:
    extra = embed.pop("extra", None)
    return run_job(load_job(write_job(folder, src, embed={**EMBED, **embed}, extra=extra)))


def _rows(folder: Path, table: str = "vectors") -> list[dict[str, Any]]:
    t = lancedb.connect(str(folder / "lance")).open_table(table)
    return t.to_arrow().select(["uri", "part", "content_key", "vector", "model", "run_id"]
                               ).to_pylist()


def _files(src: Path) -> set[str]:
    return {p.resolve().as_uri() for p in src.rglob("*") if p.is_file()}


def test_moved_and_renamed_files_cost_no_call_and_are_not_counted_as_deleted(tmp_path: Path):
    src = tmp_path / "src"
    texts = make_text_corpus(src, 40, per_folder=20)
    media = make_quickstart_media(src / "media")  # two images and a 9-page PDF (2 parts)
    first = _run(tmp_path, src, title_from="content")
    assert first.exit_code == EXIT_OK and first.stats.items_embedded == 44
    before = {(r["content_key"], tuple(r["vector"])) for r in _rows(tmp_path)}

    # 30 % of the files to another folder, 10 % renamed (texts and media alike)
    (src / "elsewhere").mkdir()
    moved = [*texts[:12], media[2]]
    for path in moved:
        path.rename(src / "elsewhere" / path.name)
    for path in [*texts[12:15], media[0]]:
        path.rename(path.with_name("renamed-" + path.name))

    job = load_job(write_job(tmp_path, src, embed={**EMBED, "title_from": "content"}))
    plan = make_plan(job, workers=1).as_dict(job)
    # plan keys what it has the payload of: texts and images, not the PDF's parts
    assert plan["items_reused"] == 16 and plan["items"] == {"document": 2}
    assert plan["files"]["moved"] == 16 and plan["delete_refusal"] is None
    second = _run(tmp_path, src, title_from="content")
    s = second.stats
    assert second.exit_code == EXIT_OK, second.problems  # no --allow-mass-delete needed
    assert s.api_calls == 0 and s.items_embedded == 0
    assert s.items_reused == 18 and s.files_new == 17  # the PDF's two parts
    assert s.files_moved == s.files_deleted == 17
    assert second.report["cost_saved_usd"] > 0
    rows = _rows(tmp_path)
    assert {r["uri"] for r in rows} == _files(src)  # every row carries its new uri
    assert len(rows) == 44
    # the same vectors, re-homed
    assert {(r["content_key"], tuple(r["vector"])) for r in rows} == before


def test_a_file_name_sent_as_the_title_makes_a_rename_a_new_request(tmp_path: Path):
    """With the default ``title_from: name`` a text file's name is part of what is sent, so
    renaming it changes its request (paid again), while moving it to another folder does not;
    an image sends no title (gemini-embedding-2 puts it in text parts only): free either way."""
    src = tmp_path / "src"
    texts = make_text_corpus(src, 4)
    media = make_quickstart_media(src / "media")
    assert _run(tmp_path, src).stats.items_embedded == 8
    texts[0].rename(texts[0].with_name("a-new-name.txt"))
    (src / "other").mkdir()
    texts[1].rename(src / "other" / texts[1].name)
    media[0].rename(media[0].with_name("a-new-name.png"))
    second = _run(tmp_path, src)
    assert second.exit_code == EXIT_OK
    assert second.stats.items_embedded == 1 and second.stats.items_reused == 2
    assert second.stats.files_moved == 2 and second.stats.files_deleted == 3


def test_duplicates_are_sent_once_and_their_copies_get_the_same_vector(tmp_path: Path):
    src = tmp_path / "src"
    originals = make_text_corpus(tmp_path / "originals", 20)
    for copy in range(10):  # 200 files, 20 contents, names all different
        folder = src / f"copy-{copy}"
        folder.mkdir(parents=True)
        for n, path in enumerate(originals):
            shutil.copy(path, folder / f"{copy}-{n}.txt")
    reused = _run(tmp_path / "reuse", src, title_from="content")
    paid = _run(tmp_path / "no-reuse", src, title_from="content", reuse=False)
    assert reused.exit_code == paid.exit_code == EXIT_OK
    assert reused.stats.items_embedded == 20 and reused.stats.items_reused == 180
    assert paid.stats.items_embedded == 200 and paid.stats.items_reused == 0
    assert reused.stats.files_done == paid.stats.files_done == 200
    rows = _rows(tmp_path / "reuse")
    assert len(rows) == 200 and len({r["uri"] for r in rows}) == 200
    by_key: dict[str, set[tuple[float, ...]]] = {}
    for r in rows:
        by_key.setdefault(r["content_key"], set()).add(tuple(r["vector"]))
    assert len(by_key) == 20 and all(len(v) == 1 for v in by_key.values())
    # the next run adds 100 more copies: all from the table
    extra = src / "copy-more"
    extra.mkdir()
    for n in range(100):
        shutil.copy(originals[n % 20], extra / f"more-{n}.txt")
    again = _run(tmp_path / "reuse", src, title_from="content")
    assert again.stats.api_calls == 0 and again.stats.items_reused == 100


def test_a_job_reuses_another_jobs_vectors_through_reuse_from(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 30)
    make_quickstart_media(src / "media")
    first = _run(tmp_path / "a", src)
    second = _run(tmp_path / "b", src, reuse_from=[str(tmp_path / "a" / "lance")])
    assert first.stats.items_embedded == 34
    assert second.exit_code == EXIT_OK and second.stats.api_calls == 0
    assert second.stats.items_reused == 34
    a = {r["uri"]: r["vector"] for r in _rows(tmp_path / "a")}
    b = {r["uri"]: r["vector"] for r in _rows(tmp_path / "b")}
    assert a.keys() == b.keys() and all(np.allclose(a[u], b[u]) for u in a)


@pytest.mark.parametrize("change", [
    {"model": "gemini-embedding-001"},
    {"output_dimensionality": 256},
    {"document_template": "document {title}: {text}"},
    {"task_type": "CLUSTERING"},
])
def test_nothing_that_changes_the_vector_is_reused(tmp_path: Path, change: dict[str, Any]):
    src = tmp_path / "src"
    make_text_corpus(src, 10)
    make_quickstart_media(src / "media")
    _run(tmp_path / "a", src)
    if "task_type" in change:  # a task type is sent to the models that take one
        _run(tmp_path / "a1", src, model="gemini-embedding-001")
        cache, base = tmp_path / "a1" / "lance", {"model": "gemini-embedding-001"}
    else:
        cache, base = tmp_path / "a" / "lance", {}
    other = _run(tmp_path / "b", src, reuse_from=[str(cache)], **base, **change)
    assert other.exit_code == EXIT_OK
    if "document_template" in change:
        # a template wraps text parts only: the media send what they sent before
        assert other.stats.items_reused == 4 and other.stats.items_embedded == 10
        return
    text_only = {**base, **change}.get("model") == "gemini-embedding-001"  # media rejected
    assert other.stats.items_reused == 0
    assert other.stats.items_embedded == (10 if text_only else 14)


def test_a_validator_setting_that_cuts_files_differently_re_embeds_only_what_it_cut(
        tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 5)
    long_text = " ".join(f"word{n} of a long note about rivers and hills" for n in range(250))
    (src / "long.txt").write_text(long_text, encoding="utf-8")
    first = _run(tmp_path / "a", src)
    assert first.stats.items_embedded == 6  # the long file fits the model's limit whole
    cut = _run(tmp_path / "b", src, reuse_from=[str(tmp_path / "a" / "lance")],
               extra={"validate": {"text_max_tokens": 512}})
    assert cut.stats.items_reused == 5  # the short files send what they sent before
    assert cut.stats.items_embedded > 1  # the long one is cut into parts: new requests


def test_a_cache_row_of_another_model_or_dimension_is_never_returned(tmp_path: Path):
    """Rows of a cache whose model column or vector size differ are not reused even when
    their content keys match (a table written by hand, or by another tool)."""
    src = tmp_path / "src"
    make_text_corpus(src, 6)
    _run(tmp_path / "a", src)
    rows = lancedb.connect(str(tmp_path / "a" / "lance")).open_table("vectors").to_arrow()
    forged = rows.set_column(rows.schema.get_field_index("model"), "model",
                             pa.array(["gemini-embedding-001"] * rows.num_rows))
    lancedb.connect(str(tmp_path / "forged")).create_table("vectors", forged)
    wider = rows.drop_columns(["vector"]).append_column("vector", pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(rows.num_rows * 256, np.float32)), 256))
    lancedb.connect(str(tmp_path / "wider")).create_table("vectors", wider)
    other = _run(tmp_path / "b", src,
                 reuse_from=[str(tmp_path / "forged"), str(tmp_path / "wider")])
    assert other.exit_code == EXIT_OK
    assert other.stats.items_reused == 0 and other.stats.items_embedded == 6


def test_a_missing_reuse_from_table_fails_the_run_before_any_call(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 3)
    for missing in (tmp_path / "nowhere", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(SinkError, match="reuse_from"):  # the CLI's exit 3
            _run(tmp_path, src, reuse_from=[str(missing)])
    assert not (tmp_path / "nowhere").exists()  # not created by looking


def test_duplicates_in_batch_api_mode_go_in_the_job_once(tmp_path: Path):
    src = tmp_path / "src"
    originals = make_text_corpus(tmp_path / "originals", 10)
    for copy in range(3):
        folder = src / f"copy-{copy}"
        folder.mkdir(parents=True)
        for path in originals:
            shutil.copy(path, folder / path.name)  # the same names: the same titles
    with Emulator(EmulatorOptions(batch_delay_s=0.1)) as emu:
        result = run_job(load_job(write_job(tmp_path, src, embed={
            "provider": "gemini", "api_key": "k", "base_url": emu.base_url,
            "model": "gemini-embedding-2", "output_dimensionality": 128, "mode": "batch",
            "batch": {"poll_initial_s": 0.1, "poll_max_s": 0.5}})))
        assert emu.state.stats.batch_items == 10 and emu.state.stats.items == 0
    assert result.exit_code == EXIT_OK and result.stats.items_reused == 20
    assert result.stats.files_done == 30 and len(_rows(tmp_path)) == 30


def test_moves_into_an_arrow_sink_are_reused_too(tmp_path: Path):
    src = tmp_path / "src"
    texts = make_text_corpus(src, 10)
    sink = {"sink": {"kind": "arrow", "path": str(tmp_path / "files")}}
    assert _run(tmp_path, src, extra=sink).stats.items_embedded == 10
    (src / "moved").mkdir()
    for path in texts[:5]:
        path.rename(src / "moved" / path.name)
    second = _run(tmp_path, src, extra=sink)
    assert second.exit_code == EXIT_OK, second.problems  # 5 of 10 gone: moved, not refused
    assert second.stats.api_calls == 0 and second.stats.items_reused == 5
    assert second.stats.files_moved == 5


def test_runs_killed_with_duplicates_in_flight_leave_one_row_per_file(tmp_path: Path):
    """SIGKILL while copies wait on their lead's vector, three times, then a run to the end:
    every file has its one row, and the contents are paid for about once."""
    src = tmp_path / "src"
    originals = make_text_corpus(tmp_path / "originals", 400)
    for copy in range(3):  # 1,200 files, 400 contents (same names: same titles)
        folder = src / f"copy-{copy}"
        folder.mkdir(parents=True)
        for path in originals:
            shutil.copy(path, folder / path.name)
    with Emulator(EmulatorOptions(latency_ms=50, per_item_ms=2)) as emu:
        job = write_job(tmp_path, src, embed={
            "provider": "gemini", "api_key": "k", "base_url": emu.base_url,
            "model": "gemini-embedding-2", "output_dimensionality": 128, "batch_size": 20,
            "concurrency": 2, "mode": "interactive"},
            extra={"run": {"flush_rows": 100, "flush_interval_s": 0.5}})
        for kill in range(3):
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-q", str(job)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            target = emu.state.stats.items + 60
            deadline = time.monotonic() + 120
            while emu.state.stats.items < target and proc.poll() is None:
                assert time.monotonic() < deadline, "the run made no progress"
                time.sleep(0.005)
            assert proc.poll() is None, f"run {kill} ended before its kill"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        final = run_job(load_job(job))
        served = emu.state.stats.items
    assert final.exit_code == EXIT_OK
    rows = _rows(tmp_path)
    assert len(rows) == 1200 and len({r["uri"] for r in rows}) == 1200
    by_key: dict[str, set[tuple[float, ...]]] = {}
    for r in rows:
        by_key.setdefault(r["content_key"], set()).add(tuple(r["vector"]))
    assert len(by_key) == 400 and all(len(v) == 1 for v in by_key.values())
    files = lancedb.connect(str(tmp_path / "lance")).open_table("files").to_arrow()
    assert files.num_rows == 1200 and set(files["status"].to_pylist()) == {"embedded"}
    # what was in flight at each kill (unflushed rows, calls under way) at most is paid again
    assert served <= 400 + 3 * (100 * 2 + 20 * 6), served
