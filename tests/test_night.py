"""A night never lies: hostile trees, crashes in any stage, outages and unwritable sinks end with
an exit code that says what happened (never 1, Python's crash status), in one line (one JSON line
under --log-format json), and the tables stay readable. Real runs against the emulator, real
Lance tables."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lancedb
import pytest
import yaml

from pipeline.cli import main
from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.outcome import EXIT_FAILED, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE
from pipeline.run import run_job
from tests.conftest import write_job

READING = ("status", "search", "report", "rejects", "batches")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def _json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line, parsed: one that is not JSON fails the test."""
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def _table(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    db = lancedb.connect(str(tmp_path / "lance"))
    if name not in db.list_tables().tables:
        return []
    table = db.open_table(name).to_arrow()
    return table.drop_columns([c for c in ("vector",) if c in table.column_names]).to_pylist()


def _hostile_tree(src: Path) -> None:
    make_text_corpus(src, 1_000)
    raw = os.fsencode(src) + b"/bad\xff\xfename.txt"
    with open(raw, "wb") as f:
        f.write(b"a file whose name is not UTF-8\n")
    (src / "new\nline.txt").write_text("a name with a newline in it\n", encoding="utf-8")
    (src / "evil\x1b[31mRED\x1b[0m\x1b]0;pwned\x07.txt").write_text("escapes\n", encoding="utf-8")
    os.symlink("loop-b", src / "loop-a")
    os.symlink("loop-a", src / "loop-b")
    os.symlink("itself", src / "itself")
    os.symlink("/nonexistent/target", src / "dangling")
    (src / "folder").mkdir()
    (src / "folder" / "inside.txt").write_text("a file in a folder\n", encoding="utf-8")
    os.symlink("folder", src / "folder-link")
    os.mkfifo(src / "a-fifo")


@pytest.mark.slow
def test_a_hostile_tree_is_embedded_file_by_file_and_never_crashes(tmp_path: Path):
    src = tmp_path / "src"
    _hostile_tree(src)
    job = write_job(tmp_path, src)
    plan = _cli("plan", str(job), "--json", "--log-format", "json")
    assert plan.returncode == EXIT_OK, plan.stderr
    _json_lines(plan.stderr)
    run = _cli("run", "-q", str(job), "--log-format", "json", "--report", "-")
    assert run.returncode == EXIT_OK, run.stderr
    events = _json_lines(run.stderr)
    assert events[-1]["event"] == "run ended"
    report = json.loads(run.stdout)
    # 1,000 texts, the non-UTF-8 name, the newline, the escapes, folder/inside.txt
    assert report["items_embedded"] == 1_004
    assert report["links_skipped"] == 1  # the folder link: counted, not a reject
    rejects = {r["key"]: r for r in _table(tmp_path, "rejects")}
    assert set(rejects) == {"loop-a", "loop-b", "itself", "dangling", "a-fifo"}
    assert "loop" in rejects["loop-a"]["message"] and "loop" in rejects["itself"]["message"]
    assert "missing" in rejects["dangling"]["message"]
    keys = {r["key"]: r["uri"] for r in _table(tmp_path, "vectors")}
    # The raw bytes are recoverable: percent-encoded in the key as in the uri.
    assert keys["bad%FF%FEname.txt"].endswith("/bad%FF%FEname.txt")
    assert "new\nline.txt" in keys
    # A second night: nothing to do, nothing fails.
    again = _cli("run", "-q", str(job), "--report", "-")
    assert again.returncode == EXIT_OK and json.loads(again.stdout)["items_embedded"] == 0
    # Names with escapes are shown escaped, never sent raw to the terminal.
    shown = _cli("rejects", str(job), "--wide")
    listed = _cli("search", str(job), "escapes", "-k", "3")
    for output in (shown.stdout, listed.stdout):
        assert "\x1b" not in output and "\x07" not in output
    assert "evil\\x1b[31mRED" in listed.stdout


def test_folder_links_are_followed_once_when_asked(tmp_path: Path):
    src, outside = tmp_path / "src", tmp_path / "elsewhere"
    make_text_corpus(src, 3)
    make_text_corpus(outside, 2, seed=5)  # contents of their own (copies would be reused)
    os.symlink(outside, src / "linked")
    os.symlink(".", src / "linked-back")  # leads back to a folder the walk is in
    job = write_job(tmp_path, src, extra={})
    spec = yaml.safe_load(job.read_text())
    spec["source"]["follow_symlinks"] = True
    job.write_text(yaml.safe_dump(spec))
    run = _cli("run", "-q", str(job), "--report", "-")
    assert run.returncode == EXIT_OK, run.stderr
    report = json.loads(run.stdout)
    assert report["items_embedded"] == 5 and report["links_skipped"] == 1
    keys = [r["key"] for r in _table(tmp_path, "vectors")]
    assert len([k for k in keys if k.startswith("linked/")]) == 2
    assert not any(k.startswith("linked-back/") for k in keys)


STAGES = {
    "listing": ("pipeline.stages.listing.Listing.diff", 1),
    "validation": ("pipeline.validate.Validator.fit", 3),
    "packing": ("pipeline.stages.packing.Packer.add", 1),
    "embedding": ("pipeline.stages.embedding.Embedder.embed_batch", 1),
    "writing": ("pipeline.stages.writing.Writer.add", 1),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_an_error_in_any_stage_exits_70_in_one_json_line_and_the_runs_row_agrees(
        tmp_path: Path, stage: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]):
    import importlib

    target, _ = STAGES[stage]
    module_name, cls_name, method = target.rsplit(".", 2)
    cls = getattr(importlib.import_module(module_name), cls_name)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"injected into {stage}")

    monkeypatch.setattr(cls, method, broken)
    make_text_corpus(tmp_path / "src", 20)
    job = write_job(tmp_path, tmp_path / "src")
    code = main(["run", "-q", "--log-format", "json", str(job)])
    assert code == EXIT_INTERNAL
    events = _json_lines(capsys.readouterr().err)
    crash = [e for e in events if e["event"] == "internal error"]
    assert len(crash) == 1 and f"injected into {stage}" in crash[0]["message"]
    assert "Traceback" in crash[0]["traceback"]
    runs = _table(tmp_path, "runs")
    assert [r["exit_code"] for r in runs] == [EXIT_INTERNAL] and runs[0]["status"] == "failed"
    assert _table(tmp_path, "rejects") == []  # nothing blamed on a file
    if stage in ("writing", "embedding"):  # the listing was done: status counts what is left
        status = json.loads(_cli("status", str(job), "--json").stdout)
        assert status["pending"]["files"] == 20 and status["pending"]["status"] == "failed"


def test_an_error_in_a_thread_of_its_own_is_one_json_line(capsys: pytest.CaptureFixture[str]):
    import threading

    from pipeline.cli import _thread_died
    from pipeline.commands.common import setup_logging

    setup_logging("json", False)
    previous = threading.excepthook
    threading.excepthook = _thread_died
    try:
        thread = threading.Thread(target=lambda: 1 / 0, name="worker-x")
        thread.start()
        thread.join()
    finally:
        threading.excepthook = previous
        setup_logging("text", False)
    (line,) = _json_lines(capsys.readouterr().err)
    assert line["level"] == "error" and "worker-x" in line["event"]
    assert "ZeroDivisionError" in line["error"]


def test_a_missing_source_fails_the_run_and_the_tables_stay_readable(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 5)
    job = write_job(tmp_path, src)
    assert _cli("run", "-q", str(job)).returncode == EXIT_OK
    src.rename(tmp_path / "unmounted")
    run = _cli("run", "-q", str(job))
    assert run.returncode == EXIT_FAILED, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "nothing was deleted" in lines[0], \
        run.stderr
    assert len(_table(tmp_path, "vectors")) == 5
    for command in READING:
        extra = ["text"] if command == "search" else []
        done = _cli(command, str(job), *extra)
        assert done.returncode == EXIT_OK, (command, done.stderr)


def test_a_share_unmounted_mid_run_fails_the_night_and_blames_no_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The source folder gone while its files are read (an unmounted share) is the source's
    failure: exit 3 saying so, no reject stored, nothing deleted, the old rows of the changed
    files kept; the next run, the share back, does the rest."""
    from connectors.local import LocalConnector

    src = tmp_path / "src"
    notes = make_text_corpus(src, 40)
    job = write_job(tmp_path, src, extra={"run": {"validate_workers": 1}})
    assert run_job(load_job(job)).exit_code == EXIT_OK
    before = {r["uri"]: r["version"] for r in _table(tmp_path, "vectors")}
    for note in notes[:5]:
        note.write_text(note.read_text(encoding="utf-8") + "Revised.\n", encoding="utf-8")
    for note in notes[-2:]:
        note.unlink()
    real_fetch, fetched = LocalConnector.fetch, []

    def fetch(self: LocalConnector, obj: Any) -> Any:
        fetched.append(obj.uri)
        if len(fetched) == 3:
            src.rename(tmp_path / "unmounted")
        return real_fetch(self, obj)

    monkeypatch.setattr(LocalConnector, "fetch", fetch)
    night = run_job(load_job(job))
    assert night.exit_code == EXIT_FAILED
    assert any("the source failed" in p and "is gone" in p for p in night.problems), night.problems
    assert _table(tmp_path, "rejects") == []
    kept = {r["uri"]: r["version"] for r in _table(tmp_path, "vectors")}
    assert kept.keys() == before.keys()  # nothing deleted
    assert {u for u in kept if kept[u] != before[u]} <= set(fetched[:2])
    (tmp_path / "unmounted").rename(src)
    monkeypatch.undo()
    again = run_job(load_job(job))
    assert again.exit_code == EXIT_OK
    assert again.stats.files_deleted == 2 and _table(tmp_path, "rejects") == []
    after = {r["uri"]: r["version"] for r in _table(tmp_path, "vectors")}
    assert len(after) == 38
    assert sorted(u for u in after if after[u] != before[u]) == \
        sorted(n.as_uri() for n in notes[:5])


def test_a_folder_that_cannot_be_listed_keeps_its_files_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder the run may not list is a reject; the files the job had in it are not seen this
    run, which does not make them gone: their rows stay until it can be listed again. (The
    folder's permission is refused by a stand-in for os.scandir: the tests may run as root,
    whom no mode stops.)"""
    src = tmp_path / "src"
    make_text_corpus(src, 12, per_folder=6)  # d0000 and d0001
    job = write_job(tmp_path, src)
    assert run_job(load_job(job)).exit_code == EXIT_OK
    hidden = src / "d0001"
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if not isinstance(path, int) and Path(os.fsdecode(path)) == hidden:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    night = run_job(load_job(job))
    assert night.exit_code == EXIT_OK and night.stats.files_deleted == 0
    assert len(_table(tmp_path, "vectors")) == 12
    rejects = _table(tmp_path, "rejects")
    assert [(r["key"], r["reason"]) for r in rejects] == [("d0001", "unreadable")]
    assert "cannot list folder" in rejects[0]["message"]
    monkeypatch.undo()
    again = run_job(load_job(job))
    assert again.exit_code == EXIT_OK and again.stats.files_unchanged == 12
    assert again.stats.api_calls == 0 and _table(tmp_path, "rejects") == []
    assert len(_table(tmp_path, "vectors")) == 12


@pytest.mark.parametrize(("error", "code"), [(errno.EIO, EXIT_OK), (errno.ESTALE, EXIT_FAILED)])
def test_a_large_files_read_error_is_its_reject_and_a_shares_stops_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, code: int):
    """A large local file is read where it is, after the listing: a disk error reading it
    (EIO) is that file's reject, the night goes on; a share's (ESTALE: the NFS server lost the
    file handle) stops the run, exit 3, blaming no file. (The errors come from a stand-in for
    os.pread on that one file: no disk here fails on demand.)"""
    import connectors.blob as blob_module

    src = tmp_path / "src"
    make_text_corpus(src, 3)
    (src / "big.txt").write_text("A long letter about the harbour. " * 200, encoding="utf-8")
    monkeypatch.setattr(blob_module, "SPOOL_BYTES", 1024)  # big.txt is read where it is
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/big.txt"):
            raise OSError(error, os.strerror(error))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    night = run_job(load_job(write_job(tmp_path, src)))
    assert night.exit_code == code, night.problems
    rejects = [(r["key"], r["reason"], r["message"]) for r in _table(tmp_path, "rejects")]
    if code == EXIT_OK:
        assert rejects == [("big.txt", "unreadable", "big.txt: cannot read: Input/output error")]
        assert len(_table(tmp_path, "vectors")) == 3
    else:
        assert rejects == []
        assert any("the source failed" in p and "Stale file handle" in p for p in night.problems)


def test_an_unwritable_sink_is_exit_3_in_one_line(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 3)
    (tmp_path / "a-file").write_text("not a folder")
    job = write_job(tmp_path, tmp_path / "src")
    spec = yaml.safe_load(job.read_text())
    spec["sink"]["uri"] = str(tmp_path / "a-file" / "lance")
    job.write_text(yaml.safe_dump(spec))
    for fmt in ("text", "json"):
        run = _cli("run", "-q", str(job), "--log-format", fmt)
        assert run.returncode == EXIT_FAILED
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "sink folder" in lines[0] and "Traceback" not in run.stderr
        if fmt == "json":
            _json_lines(run.stderr)


def test_a_google_job_can_be_tried_offline(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 3)
    job = write_job(tmp_path, tmp_path / "src", embed={
        "provider": "gemini", "api_key": "${NOT_SET_ANYWHERE_KEY}", "auth": "bearer",
        "base_url": "https://generativelanguage.googleapis.com", "model": "gemini-embedding-2",
        "output_dimensionality": 128})
    run = _cli("run", "-q", str(job), "--emulator")
    assert run.returncode == EXIT_OK, run.stderr
    assert "embed.api_key" in run.stderr and "ignored" in run.stderr
    same = _cli("plan", str(job), "--set", "embed.provider=emulator", "--json")
    assert same.returncode == EXIT_OK, same.stderr
    found = _cli("search", str(job), "text", "--emulator", "--json")
    assert found.returncode == EXIT_OK and json.loads(found.stdout)


def test_an_unreachable_ray_address_is_exit_3_in_one_json_line(tmp_path: Path):
    pytest.importorskip("ray")
    make_text_corpus(tmp_path / "src", 3)
    job = write_job(tmp_path, tmp_path / "src")
    started = time.monotonic()
    run = _cli("run", "-q", str(job), "--engine", "ray", "--address", "127.0.0.1:9",
               "--set", "run.ray_connect_timeout_s=3", "--log-format", "json")
    assert time.monotonic() - started < 60
    assert run.returncode == EXIT_FAILED
    (line,) = _json_lines(run.stderr)
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in line["message"]
    assert [r["exit_code"] for r in _table(tmp_path, "runs")] == [EXIT_FAILED]


def test_version_and_help_are_a_usage_of_their_own(tmp_path: Path):
    assert _cli("--version").returncode == EXIT_OK
    helped = _cli("--help")
    assert helped.returncode == EXIT_OK and "70" in helped.stdout
    assert "quota" not in helped.stdout.split("  3 ")[1].split("  4 ")[0]
    assert _cli("run").returncode == EXIT_USAGE
