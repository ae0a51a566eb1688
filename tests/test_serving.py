"""A table you can serve search from: a reader opening the live table over and over while runs
write (a model upgrade, changed multi-part files, kill -9 mid-run) never sees two models, nor a
file half old and half new; jobs and tables sharing a sink folder keep apart. Real runs, a real
emulator over HTTP, real Lance tables."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lancedb
import pytest

from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.outcome import EXIT_OK, EXIT_USAGE
from pipeline.run import run_job
from tests.conftest import write_job


class Reader(threading.Thread):
    """Opens the live table afresh every ``every_s`` and checks each new version it sees."""

    def __init__(self, lance: Path, check: Any, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.lance, self.check, self.every_s = lance, check, every_s
        self.seen: dict[int, Any] = {}
        self.bad: list[tuple[int, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                table = lancedb.connect(str(self.lance)).open_table("vectors")
                if table.version not in self.seen:
                    rows = table.to_arrow().select(["uri", "version", "model"]).to_pylist()
                    verdict = self.check(rows)
                    self.seen[table.version] = verdict
                    if verdict is not True:
                        self.bad.append((table.version, verdict))
            except (ValueError, RuntimeError, OSError):
                pass  # not created yet
            time.sleep(self.every_s)

    def __enter__(self) -> Reader:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(timeout=10)


def one_model(rows: list[dict[str, Any]]) -> Any:
    models = {r["model"] for r in rows}
    return True if len(models) <= 1 else sorted(models)


def whole_files(rows: list[dict[str, Any]]) -> Any:
    versions: dict[str, set[str]] = {}
    for r in rows:
        versions.setdefault(r["uri"], set()).add(r["version"])
    mixed = [u for u, v in versions.items() if len(v) > 1]
    return True if not mixed else mixed[:3]


def _cli_run(job: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-q", str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(lance: Path, table: str = "vectors") -> list[dict[str, Any]]:
    return lancedb.connect(str(lance)).open_table(table).to_arrow().drop_columns(
        ["vector"]).to_pylist()


def _kill_when(proc: subprocess.Popen[str], ready: Any, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _count(lance: Path, table: str) -> int:
    try:
        return int(lancedb.connect(str(lance)).open_table(table).count_rows())
    except (ValueError, RuntimeError, OSError):
        return 0


@pytest.mark.slow
def test_a_model_upgrade_killed_halfway_never_shows_readers_a_mix(tmp_path: Path):
    src, lance = tmp_path / "src", tmp_path / "lance"
    make_text_corpus(src, 3_000)
    with Emulator(EmulatorOptions(latency_ms=60)) as emu:
        def embed(model: str) -> dict[str, Any]:
            return {"provider": "gemini", "api_key": "k", "base_url": emu.base_url,
                    "model": model, "output_dimensionality": 256, "batch_size": 50,
                    "concurrency": 2, "mode": "interactive"}

        flush = {"run": {"flush_rows": 100}}
        old = write_job(tmp_path, src, embed=embed("gemini-embedding-001"), extra=flush)
        assert run_job(load_job(old)).exit_code == EXIT_OK
        served_before = emu.state.stats.items
        new = write_job(tmp_path, src, embed=embed("gemini-embedding-2"), extra=flush)
        plan = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", str(new), "--json"],
                              capture_output=True, text=True, check=True)
        assert "model gemini-embedding-001 -> gemini-embedding-2" in json.loads(
            plan.stdout)["upgrade"]
        with Reader(lance, one_model) as reader:
            proc = _cli_run(new)
            _kill_when(proc, lambda: _count(lance, "vectors-next") >= 1_000)
            time.sleep(0.5)  # calls the kill left in flight are answered (and counted)
            lost = emu.state.stats.items - served_before - _count(lance, "vectors-next")
            # killed halfway: the live table is the old one, whole
            assert {r["model"] for r in _rows(lance)} == {"gemini-embedding-001"}
            found = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", str(new),
                                    "boats", "--json"], capture_output=True, text=True)
            assert found.returncode == EXIT_OK, found.stderr  # in the table's own space
            assert {h["model"] for h in json.loads(found.stdout)} == {"gemini-embedding-001"}
            again = _cli_run(new)
            assert again.wait(timeout=300) == EXIT_OK, again.communicate()
            time.sleep(0.3)
        paid = emu.state.stats.items - served_before
    assert reader.bad == [] and len(reader.seen) >= 2
    rows = _rows(lance)
    assert {r["model"] for r in rows} == {"gemini-embedding-2"}
    assert len(rows) == len({r["id"] for r in rows}) == 3_000
    # Every committed item paid once: what is paid again is what the kill caught between the
    # API's answer and a commit (calls in flight, rows on their way to the writer); the
    # search's query is one more.
    assert paid == 3_000 + lost + 1
    db = lancedb.connect(str(lance))
    assert "vectors-next" not in db.list_tables().tables
    table = db.open_table("vectors")
    for name, tag in table.tags.list().items():  # every tag names an unmixed version
        table.checkout(tag["version"])
        assert one_model(table.to_arrow().select(["model"]).to_pylist()) is True, name
    table.checkout_latest()


@pytest.mark.slow
def test_changed_multi_part_files_are_never_half_old_at_any_version(tmp_path: Path):
    src, lance = tmp_path / "src", tmp_path / "lance"
    make_text_corpus(src, 40, words=400)  # each text cut into several chunks
    with Emulator(EmulatorOptions(latency_ms=80)) as emu:
        spec = {"provider": "gemini", "api_key": "k", "base_url": emu.base_url,
                "model": "gemini-embedding-2", "output_dimensionality": 128, "batch_size": 5,
                "concurrency": 2, "mode": "interactive"}
        job = write_job(tmp_path, src, embed=spec, extra={
            "validate": {"text_max_tokens": 64, "text_overlap_tokens": 0},
            "run": {"flush_rows": 7}})
        assert run_job(load_job(job)).exit_code == EXIT_OK
        first = _rows(lance)
        assert len(first) > 3 * 40
        old = {r["version"] for r in first}
        for path in sorted(src.rglob("*.txt")):
            path.write_text(path.read_text(encoding="utf-8").replace("the", "a"),
                            encoding="utf-8")
        with Reader(lance, whole_files, every_s=0.02) as reader:
            proc = _cli_run(job)
            _kill_when(proc, lambda: len({r["version"] for r in _rows(lance)} - old) >= 10)
            assert whole_files(_rows(lance)) is True  # after kill -9 too
            again = _cli_run(job)
            assert again.wait(timeout=300) == EXIT_OK, again.communicate()
            time.sleep(0.2)
    assert reader.bad == [] and len(reader.seen) >= 3
    assert whole_files(_rows(lance)) is True


def test_two_tables_and_two_jobs_in_one_sink_folder_keep_apart(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 30)
    other = tmp_path / "other"
    make_text_corpus(other, 12)
    sink = str(tmp_path / "shared")

    def job(folder: str, name: str, root: Path, table: str, dims: int) -> Path:
        path = write_job(tmp_path / folder, root, name=name, embed={
            "provider": "emulator", "model": "gemini-embedding-2",
            "output_dimensionality": dims})
        spec = json.loads(json.dumps(__import__("yaml").safe_load(path.read_text())))
        spec["sink"] = {"kind": "lance", "uri": sink, "table": table}
        path.write_text(__import__("yaml").safe_dump(spec))
        return path

    small = job("a", "docs", src, "vectors", 256)
    large = job("b", "docs-1536", src, "vectors1536", 1536)
    photos = job("c", "photos", other, "photos", 128)
    for path in (small, large, photos, small, large, photos):
        result = run_job(load_job(path))
        assert result.exit_code == EXIT_OK, result.problems
        assert result.stats.files_deleted == 0
    for path, n in ((small, 30), (large, 30), (photos, 12)):
        again = run_job(load_job(path))
        assert again.exit_code == EXIT_OK and again.stats.api_calls == 0
        assert again.stats.files_unchanged == n
    # one table, two jobs: refused in one line before anything is done
    intruder = job("d", "intruder", other, "photos", 128)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-q", str(intruder)],
                          capture_output=True, text=True)
    assert proc.returncode == EXIT_USAGE
    assert "written by job 'photos'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
