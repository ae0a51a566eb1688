"""Safe unattended runs: what is not a file's fault is never stored against the file and never
deletes anything; nothing hangs; a killed run looks killed. Real CLI processes, the emulator
over HTTP answering as Google does, real Lance tables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lancedb
import pytest

from pipeline.commands.sample_files import make_quickstart_media, make_text_corpus
from pipeline.config import load_job
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.run import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, run_job
from tests.conftest import REPO, write_job

KEY = "right-key-0123456789"


def _cli(*args: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _gemini(emu: Emulator, key: str | None, **extra: object) -> dict[str, object]:
    embed: dict[str, object] = {"provider": "gemini", "base_url": emu.base_url,
                                "model": "gemini-embedding-2", "output_dimensionality": 128,
                                **extra}
    if key is not None:
        embed["api_key"] = key
    return embed


def _rows(tmp_path: Path, table: str) -> int:
    db = lancedb.connect(str(tmp_path / "lance"))
    return db.open_table(table).count_rows() if table in db.list_tables().tables else 0


# --- 1. a wrong key fails the run, never the files -------------------------------------------

def test_a_wrong_key_fails_the_run_at_the_first_call_and_blames_no_file(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 8)
    with Emulator(EmulatorOptions(api_key=KEY, auth="google")) as emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_gemini(emu, "wrong-key-xyz"))
        started = time.monotonic()
        proc = _cli("run", str(job))
        elapsed = time.monotonic() - started
        assert proc.returncode == EXIT_FAILED, proc.stderr
        assert emu.state.stats.http_requests == 1  # stopped at the first call: no bisection
        assert elapsed < 15
        failed = [line for line in proc.stderr.splitlines() if line.startswith("run failed")]
        assert len(failed) == 1, proc.stderr
        assert "API key not valid" in failed[0] and emu.base_url in failed[0]
        assert "gemini-embedding-2" in failed[0] and "embed.api_key" in failed[0]
        assert "wrong-key-xyz" not in proc.stderr + proc.stdout
        assert _rows(tmp_path, "rejects") == 0
        assert _rows(tmp_path, "files") == 0  # no file marked rejected (or anything)

        job = write_job(tmp_path, tmp_path / "src", embed=_gemini(emu, KEY))
        fixed = _cli("run", str(job))
        assert fixed.returncode == EXIT_OK, fixed.stderr
        assert _rows(tmp_path, "vectors") == 8 and _rows(tmp_path, "rejects") == 0
    reports = sorted((tmp_path / "lance" / "reports").glob("*.json"))
    assert reports and all("wrong-key-xyz" not in p.read_text() for p in reports)


@pytest.mark.parametrize("case", ["leaked", "unknown-model"])
def test_a_refused_key_or_model_stops_the_run_with_every_file_kept(tmp_path: Path, case: str):
    make_text_corpus(tmp_path / "src", 30)
    with Emulator(EmulatorOptions(revoked_keys=("leaked-key",))) as emu:
        good = write_job(tmp_path, tmp_path / "src", embed=_gemini(emu, KEY))
        assert run_job(load_job(good)).exit_code == EXIT_OK
        make_text_corpus(tmp_path / "src" / "more", 5, seed=3)
        bad = _gemini(emu, "leaked-key") if case == "leaked" else \
            _gemini(emu, KEY, model="gemini-embedding-9")
        result = run_job(load_job(write_job(tmp_path, tmp_path / "src", embed=bad)))
    assert result.exit_code == EXIT_FAILED
    assert result.stats.rejects == 0 and result.stats.files_deleted == 0
    assert _rows(tmp_path, "rejects") == 0
    if case == "leaked":  # same model: every earlier row is still there
        assert _rows(tmp_path, "vectors") == 30


def test_gemini_without_a_key_is_a_config_error_for_run_but_not_for_plan_or_status(
        tmp_path: Path):
    make_text_corpus(tmp_path / "src", 3)
    job = write_job(tmp_path, tmp_path / "src", embed={
        "provider": "gemini", "api_key": "${EP_UNSET_KEY_VAR}", "model": "gemini-embedding-2"})
    env = {k: v for k, v in os.environ.items() if k != "EP_UNSET_KEY_VAR"}
    run = _cli("run", str(job), env=env)
    assert run.returncode == 2
    assert "embed.api_key: environment variable EP_UNSET_KEY_VAR is not set" in run.stderr
    assert "Traceback" not in run.stderr
    assert _cli("plan", str(job), env=env).returncode == 0
    assert _cli("status", str(job), env=env).returncode == 0


def test_a_task_type_typo_is_a_config_error_with_a_hint(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 1)
    job = write_job(tmp_path, tmp_path / "src", embed={
        "provider": "emulator", "model": "gemini-embedding-001", "task_type": "RETRIEVAL_DOC"})
    proc = _cli("run", str(job))
    assert proc.returncode == 2
    assert "embed.task_type" in proc.stderr and "did you mean 'RETRIEVAL_DOCUMENT'" in proc.stderr


# --- 2. an emptied source does not wipe the table ----------------------------------------------

@pytest.mark.parametrize("sink", ["lance", "arrow"])
def test_an_emptied_source_keeps_every_row_until_told(tmp_path: Path, sink: str):
    src = tmp_path / "src"
    make_text_corpus(src, 20)
    extra = {} if sink == "lance" else {"sink": {"kind": "arrow", "path": str(tmp_path / "out")}}
    job = write_job(tmp_path, src, extra=extra)

    def vectors() -> int:
        if sink == "lance":
            return _rows(tmp_path, "vectors")
        import pyarrow.dataset as ds
        return ds.dataset(tmp_path / "out", format="parquet").count_rows()

    assert _cli("run", "-q", str(job)).returncode == EXIT_OK
    for path in src.rglob("*.txt"):
        path.unlink()
    refused = _cli("run", str(job))
    assert refused.returncode == EXIT_FAILED
    line = [x for x in refused.stderr.splitlines() if x.startswith("run failed")]
    assert line and "20 of the 20 files" in line[0] and "listed 0 files" in line[0]
    assert "--allow-mass-delete" in line[0]
    assert vectors() == 20
    allowed = _cli("run", "--allow-mass-delete", str(job))
    assert allowed.returncode == EXIT_OK, allowed.stderr
    assert vectors() == 0


def test_a_few_deletions_pass_and_many_are_refused(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 20)
    job = load_job(write_job(tmp_path, src))
    run_job(job)
    files = sorted(src.rglob("*.txt"))
    files[0].unlink()  # 1 of 20: 5 %, under the default 20 %
    assert run_job(job).stats.files_deleted == 1
    for path in files[1:8]:  # 7 of 19: 37 %
        path.unlink()
    result = run_job(job)
    assert result.exit_code == EXIT_FAILED and result.stats.files_deleted == 0
    assert _rows(tmp_path, "vectors") == 19
    lenient = load_job(write_job(tmp_path, src, extra={"run": {"max_delete_fraction": 0.5}}))
    assert run_job(lenient).stats.files_deleted == 7


def test_an_empty_s3_prefix_does_not_wipe_the_table(tmp_path: Path, s3_server: object):
    from tests.conftest import S3Server

    assert isinstance(s3_server, S3Server)
    store = s3_server.store("corpus")
    for i in range(6):
        store.put(f"safety/n{i}.txt", f"note {i} about harbours".encode())
    job = write_job(tmp_path, tmp_path, extra={"source": s3_server.source("corpus", "safety/")})
    assert run_job(load_job(job)).stats.items_embedded == 6
    for i in range(6):
        store.delete(f"safety/n{i}.txt")
    result = run_job(load_job(job))
    assert result.exit_code == EXIT_FAILED and result.stats.files_deleted == 0
    assert _rows(tmp_path, "vectors") == 6
    assert any("refused to delete" in p for p in result.problems)


# --- 3. nothing hangs -------------------------------------------------------------------------

def _fifo_job(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    make_text_corpus(src, 3)
    os.mkfifo(src / "pipe.txt")
    return write_job(tmp_path, src, extra={"validate": {"file_timeout_s": 3}})


def test_a_fifo_is_rejected_at_listing_and_run_and_plan_end(tmp_path: Path):
    job = _fifo_job(tmp_path)
    started = time.monotonic()
    run = _cli("run", str(job), timeout=60)
    assert time.monotonic() - started < 3 + 10
    assert run.returncode == EXIT_OK, run.stderr
    db = lancedb.connect(str(tmp_path / "lance"))
    (reject,) = db.open_table("rejects").to_arrow().to_pylist()
    assert reject["reason"] == "unsupported" and "not a regular file (a FIFO)" in reject["message"]
    started = time.monotonic()
    plan = _cli("plan", "--json", str(job), timeout=60)
    assert time.monotonic() - started < 3 + 10 and plan.returncode == 0, plan.stderr


# A parser that never returns, put into the real CLI processes (and plan's spawned workers,
# which inherit PYTHONPATH) by a sitecustomize module: files named "hang*" wait forever in a
# way no cancellation ends; "stuck*" also block the timer signal, as C code would.
_HANG = textwrap.dedent('''
    import signal, threading
    import pipeline.validate as v

    _decode = v.decode_text

    def decode_text(data):
        head = data[:5]
        if head == b"stuck":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        if head in (b"hang!", b"stuck"):
            threading.Event().wait()
        return _decode(data)

    v.decode_text = decode_text
''')


def _hang_env(tmp_path: Path) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_HANG)
    repo = str(REPO)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), repo])}


def test_a_parser_that_never_returns_cannot_keep_run_or_plan_alive(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 4)
    (src / "hang.txt").write_bytes(b"hang! " * 10)
    (src / "stuck.txt").write_bytes(b"stuck " + b"x" * 1_100_000)  # large: planned alone
    job = write_job(tmp_path, src, extra={"validate": {"file_timeout_s": 1}})
    env = _hang_env(tmp_path)
    limit = 1 * 1.5 + 1  # the per-file deadline
    started = time.monotonic()
    run = _cli("run", str(job), env=env, timeout=90)
    assert time.monotonic() - started < limit + 15, "the run did not end"
    assert run.returncode == EXIT_OK, run.stderr
    db = lancedb.connect(str(tmp_path / "lance"))
    reasons = {r["key"]: r["reason"] for r in db.open_table("rejects").to_arrow().to_pylist()}
    assert reasons == {"hang.txt": "timeout", "stuck.txt": "timeout"}
    assert db.open_table("vectors").count_rows() == 4

    (src / "hang.txt").write_bytes(b"hang! again")  # changed: planned again
    (src / "stuck.txt").write_bytes(b"stuck again " + b"y" * 1_100_000)
    started = time.monotonic()
    plan = _cli("plan", "--json", str(job), env=env, timeout=90)
    assert time.monotonic() - started < limit + 25, "plan did not end"
    assert plan.returncode == 0, plan.stderr
    assert '"timeout": 2' in plan.stdout


def test_sigterm_ends_a_run_committing_what_is_done_and_status_shows_what_is_left(
        tmp_path: Path):
    make_text_corpus(tmp_path / "src", 600)
    with Emulator(EmulatorOptions(latency_ms=150)) as emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_gemini(
            emu, KEY, batch_size=10, concurrency=1), extra={"run": {"flush_rows": 20}})
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while emu.state.stats.items < 60:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == EXIT_INTERRUPTED, err
    done = _rows(tmp_path, "vectors")
    assert 40 <= done < 600  # served at the signal, less the call it cut short
    (line,) = [x for x in err.splitlines() if x.startswith("interrupted:")]
    assert f"{600 - done:,} files still to do" in line
    status = _cli("status", str(job))
    assert f"is stopped: {600 - done:,} files still to do" in status.stdout, status.stdout


def test_a_killed_run_shows_its_pending_files_in_status(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 400)
    with Emulator(EmulatorOptions(latency_ms=150)) as emu:
        job = write_job(tmp_path, tmp_path / "src", embed=_gemini(
            emu, KEY, batch_size=10, concurrency=1), extra={"run": {"flush_rows": 20}})
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-q", str(job)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while emu.state.stats.items < 100:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.kill()
        proc.wait(timeout=20)
    db = lancedb.connect(str(tmp_path / "lance"))
    done = db.open_table("files").count_rows()
    status = _cli("status", str(job))
    assert f"is killed: {400 - done:,} files still to do" in status.stdout, status.stdout


# --- 6. the quickstart changes no tracked file --------------------------------------------------

def test_generated_samples_are_the_same_bytes_every_time(tmp_path: Path):
    first = {p.name: p.read_bytes() for p in make_quickstart_media(tmp_path / "a")}
    time.sleep(1.1)  # PDF writers stamp the second
    second = {p.name: p.read_bytes() for p in make_quickstart_media(tmp_path / "b")}
    assert first == second and len(first) == 3


# --- 9. consistent counts and reasons -----------------------------------------------------------

def test_summary_counts_add_up_and_broken_links_say_so(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 5)
    (src / "dangling.txt").symlink_to(src / "no-such-file.txt")
    os.mkfifo(src / "pipe")
    (src / "empty.pdf").write_bytes(b"")
    result = run_job(load_job(write_job(tmp_path, src)))
    s = result.stats
    assert s.files_seen == 8 == s.files_new + s.files_changed + s.files_unchanged \
        + s.files_rejected_at_listing
    assert s.files_rejected_at_listing == 2
    db = lancedb.connect(str(tmp_path / "lance"))
    by_key = {r["key"]: r for r in db.open_table("rejects").to_arrow().to_pylist()}
    assert "target is missing" in by_key["dangling.txt"]["message"]
    assert by_key["empty.pdf"]["reason"] == "empty"
    assert by_key["pipe"]["reason"] == "unsupported"
