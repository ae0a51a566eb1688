"""Object stores as sources and sinks, each test against every store: a real S3-compatible server
(SeaweedFS) and a real Azure Blob Storage server (Azurite), started by the test session."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import lancedb
import obstore
import polars as pl
import pytest

from pipeline.config import load_job
from pipeline.run import EXIT_FAILED, EXIT_OK, run_job
from tests.conftest import write_job

SAMPLE = ["pdf/tracemonkey.pdf", "pdf/minimal-document.pdf", "image/smile.png",
          "image/flower.jpg", "audio/crunching.mp3", "video/chaplin.mp4", "bad/broken.png",
          "bad/rc4-40.pdf"]


def _put_many(store: object, items: dict[str, bytes]) -> None:
    async def main() -> None:
        limiter = anyio.CapacityLimiter(32)

        async def put(key: str, data: bytes) -> None:
            async with limiter:
                await obstore.put_async(store, key, data)  # type: ignore[arg-type]

        async with anyio.create_task_group() as tg:
            for key, data in items.items():
                tg.start_soon(put, key, data)

    anyio.run(main)


def _rows(job: Path) -> pl.DataFrame:
    frame = pl.from_arrow(lancedb.connect(load_job(job).sink.uri).open_table("vectors").to_arrow())
    assert isinstance(frame, pl.DataFrame)
    return frame


def _sink(server: Any, container: str, path: str) -> dict[str, Any]:
    """A Lance sink in ``container`` of ``server``, with its settings (the source's would do
    too; the sink's own are the case to prove)."""
    source = server.source(container)
    options = {k: v for k, v in source.items() if k not in ("kind", "bucket", "container",
                                                            "prefix")}
    key = "s3" if server.scheme == "s3" else "azure"
    return {"kind": "lance", "uri": f"{server.scheme}://{container}/{path}", key: options}


def test_job_over_a_bucket_then_etag_driven_increments(tmp_path: Path, object_server: Any,
                                                       corpus_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    server = object_server
    store = server.store("corpus")
    _put_many(store, {f"run1/{name}": (corpus_dir / name).read_bytes() for name in SAMPLE})
    job = write_job(tmp_path, tmp_path, extra={"source": server.source("corpus", "run1")})
    first = run_job(load_job(job))
    assert first.exit_code == EXIT_OK
    rows = _rows(job)
    assert set(rows["key"]) == set(SAMPLE) - {"bad/broken.png", "bad/rc4-40.pdf"}
    assert all(u.startswith(f"{server.scheme}://corpus/run1/") for u in rows["uri"])
    assert all(v.startswith("etag:") for v in rows["version"])
    assert rows.filter(pl.col("key") == "pdf/tracemonkey.pdf").height == 3

    def no_read(self, obj):  # type: ignore[no-untyped-def]
        raise AssertionError(f"{obj.key} was read")

    with monkeypatch.context() as m:
        m.setattr(server.connector, "read", no_read)
        m.setattr(server.connector, "fetch", no_read)
        same = run_job(load_job(job))
    assert same.stats.api_calls == 0 and same.stats.files_unchanged == len(SAMPLE)

    obstore.put(store, "run1/image/smile.png", (corpus_dir / "image/horse.png").read_bytes())
    obstore.delete(store, "run1/video/chaplin.mp4")
    obstore.put(store, "run1/notes/new.txt", b"A new note about harbours.")
    third = run_job(load_job(job))
    s = third.stats
    assert (s.files_changed, s.files_deleted, s.files_new) == (1, 1, 1)
    rows = _rows(job)
    assert "video/chaplin.mp4" not in set(rows["key"]) and "notes/new.txt" in set(rows["key"])
    assert rows.filter(pl.col("key") == "image/smile.png").height == 1
    assert rows["id"].n_unique() == rows.height


def test_large_objects_are_streamed_to_disk_once_and_embedded_the_same(
        tmp_path: Path, object_server: Any, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Objects over the spool size are downloaded in chunks to a temporary file (a 2 GB video
    must not cost 2 GB of memory), each fetched once, and give the rows they give in memory."""
    import connectors.blob as blob_module

    server = object_server
    media = ["video/chaplin.mp4", "audio/crunching.mp3", "pdf/tracemonkey.pdf"]
    _put_many(server.store("spool"), {f"m/{n}": (corpus_dir / n).read_bytes() for n in media})
    in_memory = write_job(tmp_path / "mem", tmp_path, extra={"source": server.source("spool", "m")})
    assert run_job(load_job(in_memory)).exit_code == EXIT_OK

    fetched: list[tuple[str, bool]] = []
    real_fetch = server.connector.fetch

    def counting_fetch(self, obj):  # type: ignore[no-untyped-def]
        blob = real_fetch(self, obj)
        fetched.append((obj.key, blob.in_memory))
        return blob

    monkeypatch.setattr(blob_module, "SPOOL_BYTES", 64 * 1024)
    monkeypatch.setattr(server.connector, "fetch", counting_fetch)
    spooled = write_job(tmp_path / "disk", tmp_path, extra={"source": server.source("spool", "m")})
    assert run_job(load_job(spooled)).exit_code == EXIT_OK
    assert sorted(fetched) == sorted((n, False) for n in media)  # once each, all on disk
    cols = ["key", "part", "id", "vector"]
    assert _rows(spooled).select(cols).sort("id").equals(_rows(in_memory).select(cols).sort("id"))


def test_plan_reads_media_by_range_and_predicts_what_a_local_plan_does(
        tmp_path: Path, object_server: Any, corpus_dir: Path):
    """``plan`` over a store reads media, PDFs and images from their headers and indexes
    (fetched by range): under a third of the corpus's bytes, and the same items and rejects
    (truncated media, lying headers included) as a plan of the same files on the local disk."""
    from pipeline.commands.planner import make_plan

    folders = ("audio", "video", "pdf", "image", "bad")
    files = {p.relative_to(corpus_dir).as_posix(): p for folder in folders
             for p in sorted((corpus_dir / folder).iterdir()) if p.is_file()}
    _put_many(object_server.store("corpus"), {f"plan/{k}": p.read_bytes()
                                              for k, p in files.items()})
    local = {"kind": "local", "root": str(corpus_dir),
             "include": [f"{folder}/**/*" for folder in folders]}
    plans = {}
    for name, source in (("store", object_server.source("corpus", "plan")), ("local", local)):
        job = load_job(write_job(tmp_path / name, tmp_path, extra={"source": source}))
        plans[name] = make_plan(job).as_dict(job)
    store, disk = plans["store"], plans["local"]
    total = sum(p.stat().st_size for p in files.values())
    assert store["bytes_of_files_read"] == disk["bytes_of_files_read"] == total
    assert disk["bytes_read"] == total  # the local plan reads every file, as a run does
    assert 0 < store["bytes_read"] <= 0.3 * total, store["bytes_read"] / total
    assert (store["items"], store["rejects"]) == (disk["items"], disk["rejects"])
    assert store["rejects"]["corrupt"] >= 10  # truncated and broken files found by range too


def test_plan_over_a_store_that_goes_down_fails_instead_of_guessing(
        tmp_path: Path, object_server: Any, monkeypatch: pytest.MonkeyPatch):
    """A store that stops answering once the plan has listed it fails the plan (the command's
    exit 3) instead of counting its files as unreadable."""
    from pipeline.commands import planner
    from pipeline.errors import SourceUnavailable

    server = object_server
    _put_many(server.store("restart"), {f"plan-down/{i}.txt": f"a tide table {i}".encode()
                                        for i in range(5)})
    source = server.source("restart", "plan-down", max_retries=0, timeout_s=2)
    job = load_job(write_job(tmp_path, tmp_path, extra={"source": source}))
    assert planner.make_plan(job, workers=1).as_dict(job)["files"]["new"] == 5
    real = planner._validate_all

    def validate_all(*args: Any, **kwargs: Any) -> Any:
        server.stop()  # listed: down before any file is read
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "_validate_all", validate_all)
    try:
        with pytest.raises(SourceUnavailable, match="cannot be reached"):
            planner.make_plan(job, workers=1)
    finally:
        server.start()


def test_an_object_changed_since_it_was_listed_is_not_read_by_range(tmp_path: Path,
                                                                   object_server: Any):
    from pipeline.errors import ConnectorError
    from pipeline.records import SourceObject

    store = object_server.store("corpus")
    obstore.put(store, "changing/a.bin", b"first version " * 10_000)
    job = load_job(write_job(tmp_path, tmp_path,
                             extra={"source": object_server.source("corpus", "changing")}))
    from connectors import connector_for

    connector = connector_for(job)
    [obj] = [o for o in connector.list() if isinstance(o, SourceObject)]
    with connector.ranged(obj) as blob:
        assert blob.head(5) == b"first" and blob.fetched < obj.size
    obstore.put(store, "changing/a.bin", b"second version " * 10_000)
    with connector.ranged(obj) as blob, pytest.raises(ConnectorError, match="since it was listed"):
        blob.head(5)


def test_a_full_temporary_folder_fails_the_run_and_blames_no_file(
        tmp_path: Path, object_server: Any, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Spooling a large object to a full TMPDIR is not the object's fault: the run fails (exit
    3) with one line that says where and what to do, no reject stored, the rows kept."""
    import errno
    import tempfile

    import connectors.blob as blob_module
    from pipeline.errors import ScratchError

    server = object_server
    _put_many(server.store("spool"), {"full/a.txt": b"a note about tides",
                                      "full/v.mp4": (corpus_dir / "video/chaplin.mp4").read_bytes()})
    job = write_job(tmp_path, tmp_path, extra={"source": server.source("spool", "full")})
    assert run_job(load_job(job)).exit_code == EXIT_OK
    before = _rows(job).height
    obstore.put(server.store("spool"), "full/v.mp4",
                (corpus_dir / "video/fire2.mp4").read_bytes())  # changed: fetched again

    class Full:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    monkeypatch.setattr(blob_module, "SPOOL_BYTES", 1024)
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **_: Full())
    with pytest.raises(ScratchError, match=r"temporary folder .* point TMPDIR elsewhere"):
        run_job(load_job(job))  # a PipelineError: the command's exit 3
    assert lancedb.connect(load_job(job).sink.uri).open_table("rejects").count_rows() == 0
    assert _rows(job).height == before
    monkeypatch.undo()  # room again: the next run takes the lock and does the changed file
    again = run_job(load_job(job))
    assert again.exit_code == EXIT_OK and again.stats.files_changed == 1


@pytest.mark.slow
def test_ten_thousand_objects_list_and_an_unchanged_night_costs_nothing(
        tmp_path: Path, object_server: Any, monkeypatch: pytest.MonkeyPatch):
    n = 10_050
    _put_many(object_server.store("big"),
              {f"notes/{i:06d}.txt": f"note {i} about tides and boats".encode() for i in range(n)})
    job = write_job(tmp_path, tmp_path, extra={"source": object_server.source("big", "notes")})
    first = run_job(load_job(job))
    assert first.exit_code == EXIT_OK and first.stats.items_embedded == n

    def no_read(self, obj):  # type: ignore[no-untyped-def]
        raise AssertionError(f"{obj.key} was read")

    monkeypatch.setattr(object_server.connector, "read", no_read)
    monkeypatch.setattr(object_server.connector, "fetch", no_read)
    night = run_job(load_job(job))
    assert night.stats.files_unchanged == n and night.stats.api_calls == 0
    assert _rows(job).height == n


def test_lance_sink_on_the_store_and_search(tmp_path: Path, object_server: Any):
    server = object_server
    _put_many(server.store("sink"), {
        "in/pasta.txt": b"Cook the spaghetti in salted boiling water.",
        "in/stars.txt": b"A telescope mirror gathers starlight."})
    job = write_job(tmp_path, tmp_path, extra={"source": server.source("sink", "in"),
                                               "sink": _sink(server, "sink", "out")})
    first = run_job(load_job(job))
    assert first.exit_code == EXIT_OK and first.stats.items_embedded == 2
    listed = {m["path"] for page in obstore.list(server.store("sink"), prefix="out/")
              for m in page}
    assert any(p.startswith("out/vectors.lance/") for p in listed)
    assert not any(p.endswith(".lock") for p in listed)  # the job's lock is released
    again = run_job(load_job(job))  # the manifest on the store: nothing to do
    assert again.exit_code == EXIT_OK and again.stats.files_unchanged == 2
    assert again.stats.api_calls == 0
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", str(job),
                          "boiling spaghetti", "-k", "1"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "pasta.txt" in out.stdout


def test_server_restart_in_the_middle_of_a_run(tmp_path: Path, object_server: Any):
    n = 600
    _put_many(object_server.store("restart"),
              {f"r/{i:04d}.txt": f"restart note {i}".encode() for i in range(n)})
    job = write_job(tmp_path, tmp_path, embed={
        "provider": "emulator", "model": "gemini-embedding-2", "output_dimensionality": 128,
        "batch_size": 10, "concurrency": 1, "emulator": {"latency_ms": 100}},
        extra={"source": object_server.source("restart", "r"),
               "run": {"validate_workers": 1, "flush_rows": 50, "queue_size": 1}})
    restarted_at: list[float] = []

    def restart() -> None:
        time.sleep(2.0)
        restarted_at.append(time.monotonic())  # the server goes down now (a run takes >= 6 s)
        object_server.restart()

    restarter = threading.Thread(target=restart)
    restarter.start()
    first = run_job(load_job(job))
    finished_at = time.monotonic()
    restarter.join()
    assert restarted_at and restarted_at[0] < finished_at, "the restart must fall inside the run"
    # Reads retried past the restart finish the run; reads that ran out of retries stop it
    # (exit 3): the store's failure, never the files'.
    assert first.exit_code in (EXIT_OK, EXIT_FAILED)
    rejects = lancedb.connect(load_job(job).sink.uri).open_table("rejects")
    assert rejects.count_rows() == 0
    final = first if first.exit_code == EXIT_OK else run_job(load_job(job))
    assert final.exit_code == EXIT_OK
    rows = _rows(job)
    assert rows.height == n and rows["id"].n_unique() == n
    assert rejects.count_rows() == 0


def test_a_store_down_mid_run_fails_the_night_and_blames_no_file(
        tmp_path: Path, object_server: Any, monkeypatch: pytest.MonkeyPatch):
    """A store that stops answering while files are read (its retries spent) is the source's
    failure: the run exits 3 saying so, stores no reject, deletes nothing and keeps the old
    rows of the changed files; the next run, the store back, does the rest."""
    server = object_server
    store = server.store("restart")
    _put_many(store, {f"down/{i:03d}.txt": f"harbour note {i}".encode() for i in range(30)})
    source = server.source("restart", "down", max_retries=0, timeout_s=2)
    job = write_job(tmp_path, tmp_path, extra={"source": source,
                                               "run": {"validate_workers": 1}})
    assert run_job(load_job(job)).exit_code == EXIT_OK
    before = _rows(job).select("uri", "version").sort("uri")
    _put_many(store, {f"down/{i:03d}.txt": f"harbour note {i}, revised".encode()
                      for i in range(10)})
    obstore.delete(store, ["down/028.txt", "down/029.txt"])
    real_fetch, fetched = server.connector.fetch, []

    def fetch(self: Any, obj: Any) -> Any:
        fetched.append(obj.key)
        if len(fetched) == 4:
            server.stop()  # down from the fourth read on
        return real_fetch(self, obj)

    monkeypatch.setattr(server.connector, "fetch", fetch)
    try:
        night = run_job(load_job(job))
    finally:
        server.start()
    assert night.exit_code == EXIT_FAILED
    assert any("the source failed" in p and "cannot be reached" in p for p in night.problems)
    assert server.secret not in " ".join(night.problems)
    db = lancedb.connect(load_job(job).sink.uri)
    assert db.open_table("rejects").count_rows() == 0
    # nothing deleted; only files read before the store went down may have new rows
    kept = _rows(job).select("uri", "key", "version").sort("uri")
    assert kept["uri"].to_list() == before["uri"].to_list()
    moved_on = kept.filter(pl.col("version") != before["version"])
    assert set(moved_on["key"]) <= set(fetched[:3])
    monkeypatch.undo()
    again = run_job(load_job(job))
    assert again.exit_code == EXIT_OK and again.stats.files_deleted == 2
    after = _rows(job)
    assert after.height == 28 and after["uri"].n_unique() == 28
    assert db.open_table("rejects").count_rows() == 0
    old = dict(before.iter_rows())
    changed = sorted(r["key"] for r in after.iter_rows(named=True) if old[r["uri"]] != r["version"])
    assert changed == [f"{i:03d}.txt" for i in range(10)]


@pytest.mark.parametrize("case", ["missing-bucket", "wrong-secret", "unreachable"])
def test_clear_one_line_errors(tmp_path: Path, object_server: Any, case: str):
    source, expect = object_server.broken_source(case)
    job = write_job(tmp_path, tmp_path, extra={"source": source})
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_FAILED
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert expect in lines[0] and ("corpus" in lines[0] or "no-such-" in lines[0]), lines[0]
    assert "Traceback" not in proc.stderr
    assert object_server.secret not in proc.stderr
    assert all(source[k] not in proc.stderr for k in ("secret_access_key", "account_key")
               if k in source)


def test_access_denied_is_its_own_line(tmp_path: Path, s3_server: Any):
    source = s3_server.source("corpus", "run1", access_key_id="outsider",
                              secret_access_key="outsider-pw")
    job = write_job(tmp_path, tmp_path, extra={"source": source})
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_FAILED
    assert "access denied" in proc.stderr and "outsider-pw" not in proc.stderr


def test_init_for_an_azure_container_lists_it_and_writes_a_job_that_runs(tmp_path: Path,
                                                                        azurite_server: Any):
    from tests.azurite import ACCOUNT, KEY

    _put_many(azurite_server.store("corpus"), {
        "init/a.txt": b"Tides follow the moon.", "init/b.txt": b"Harbours shelter boats."})
    env = {**os.environ, "AZURE_STORAGE_ENDPOINT": azurite_server.endpoint,
           "AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": KEY}
    out = tmp_path / "azure.yaml"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "init", "az://corpus/init",
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert done.returncode == EXIT_OK, done.stderr
    text = out.read_text(encoding="utf-8")
    assert "kind: azure" in text and "2 files" in done.stderr + text and KEY not in text
    ran = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-q", "--emulator",
                          str(out)], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert ran.returncode == EXIT_OK, ran.stderr
