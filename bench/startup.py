"""How long `embedpipe --version`, `--help` and `status` take as whole processes (the
scheduler's and the operator's first impression), and what importing pipeline.cli costs.

    python bench/startup.py [--repeat 5] [--json]

Each figure is the median of --repeat runs of a fresh process. The target (the "night never
lies" issue) is --version and --help under 0.3 s and status under 1 s on a small table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(args: list[str], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, cwd=REPO)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "pipeline.cli"]
    folder = Path(tempfile.mkdtemp(prefix="embedpipe-startup-"))
    try:
        (folder / "src").mkdir()
        (folder / "src" / "a.txt").write_text("a small table for status\n", encoding="utf-8")
        job = folder / "job.yaml"
        job.write_text("name: s\nsource: {kind: local, root: ./src}\nembed: {provider: emulator, "
                       "output_dimensionality: 128}\nsink: {kind: lance, uri: ./lance}\n",
                       encoding="utf-8")
        subprocess.run([*cli, "run", "-q", str(job)], check=True, capture_output=True)
        figures = {
            "date": time.strftime("%Y-%m-%d"),
            "import_pipeline_cli_s": timed([sys.executable, "-c", "import pipeline.cli"],
                                           args.repeat),
            "version_s": timed([*cli, "--version"], args.repeat),
            "help_s": timed([*cli, "--help"], args.repeat),
            "status_s": timed([*cli, "status", str(job)], args.repeat),
            "python_alone_s": timed([sys.executable, "-c", "pass"], args.repeat),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(figures))
        return
    for name, value in figures.items():
        print(f"{name:<24} {value if isinstance(value, str) else f'{value:.3f} s'}")


if __name__ == "__main__":
    main()
