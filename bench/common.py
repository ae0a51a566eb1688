"""Shared benchmark plumbing: a corpus in a temp folder, a job YAML, an in-process run."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import yaml

from pipeline.config import load_job
from pipeline.runner import Run, RunResult


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
