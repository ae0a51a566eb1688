"""Shared benchmark plumbing: a corpus in a temp folder, a job YAML, an in-process run, an
emulator in a process of its own."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import yaml

from pipeline.config import load_job
from pipeline.run import Run, RunResult


@dataclass
class Timed:
    result: RunResult
    wall_s: float


def write_job(folder: Path, root: Path, embed: dict[str, Any], **extra: Any) -> Path:
    job = {"name": "bench", "source": {"kind": "local", "root": str(root)}, "embed": embed,
           "sink": {"kind": "lance", "uri": str(folder / "lance")}, **extra}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


def run(job_path: Path, stop_after_s: float | None = None) -> Timed:
    """Run the job in this process; with ``stop_after_s``, stop it cleanly after that long."""
    job = Run(load_job(job_path))

    async def main() -> RunResult:
        async with anyio.create_task_group() as tg:
            if stop_after_s is not None:
                async def stopper() -> None:
                    await anyio.sleep(stop_after_s)
                    job.stop()
                tg.start_soon(stopper)
            result = await job.execute()
            tg.cancel_scope.cancel()
        return result

    started = time.perf_counter()
    result = anyio.run(main)
    return Timed(result, time.perf_counter() - started)


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="embedpipe-bench-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def emulator_process(*flags: str) -> Iterator[str]:
    """``embedpipe emulator`` with these flags in a process of its own; yields its base URL
    once it answers, stops it on exit."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "emulator", "--port", str(port), *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)


# Linux keeps a process's peak RSS across exec, starting from the RSS of the process that forked
# it: measured from here (hundreds of MB after seeding 10M rows) it would count this process.
# A small launcher forks the run instead, and reports its wall time, exit code and peak RSS.
LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
                  "wall_s": time.perf_counter() - started}))
"""

