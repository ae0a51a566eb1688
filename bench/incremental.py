"""Nightly runs at scale: does a no-change run cost nothing, and does memory stay flat?

    python bench/incremental.py [--small 10000] [--large 100000] [--json]

Against an emulator in its own process, each run in its own process (its peak RSS is its own):
a first run over ``small`` and over ``large`` tiny files (peak RSS of each: memory must not grow
with the corpus), then a no-change re-run over the large corpus (wall time, peak RSS and API
calls, which must be 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emulator_process, workdir, write_job
from pipeline.commands.sample_files import make_text_corpus

CHILD = r"""
import json, resource, sys
from pipeline.cli import main
code = main(["run", "-q", "--report", sys.argv[2], sys.argv[1]])
report = json.loads(open(sys.argv[2]).read())
report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(report))
"""


def run(job: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(job), str(job.parent / "report.json")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    result: dict = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = workdir()
    try:
        with emulator_process() as base:
            jobs = {}
            for name, n in (("small", args.small), ("large", args.large)):
                make_text_corpus(folder / name / "src", n)
                jobs[name] = write_job(folder / name, folder / name / "src", {
                    "provider": "gemini", "api_key": "any-key",
                    "base_url": base, "model": "gemini-embedding-2",
                    "output_dimensionality": 128, "mode": "interactive"})
            small = run(jobs["small"])
            large = run(jobs["large"])
            calls_before = httpx.get(base + "/emulator/stats").json()["http_requests"]
            again = run(jobs["large"])
            calls_after = httpx.get(base + "/emulator/stats").json()["http_requests"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    figures = {
        "first_small_files": args.small, "first_small_wall_s": small["wall_s"],
        "rss_10k_mb": round(small["peak_rss_mb"], 1),
        "first_large_files": args.large, "first_large_wall_s": large["wall_s"],
        "rss_100k_mb": round(large["peak_rss_mb"], 1),
        "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 2),
        "nochange_files_unchanged": again["files_unchanged"],
        "nochange_wall_s": again["wall_s"], "nochange_rss_mb": round(again["peak_rss_mb"], 1),
        "nochange_api_calls": calls_after - calls_before,
    }
    print(f"{'':30}{args.small:>12,}{args.large:>12,} files")
    print(f"{'first run wall s':30}{small['wall_s']:>12}{large['wall_s']:>12}")
    print(f"{'first run peak RSS MB':30}{figures['rss_10k_mb']:>12}{figures['rss_100k_mb']:>12}"
          f"   (ratio {figures['rss_ratio']})")
    print(f"no-change re-run over {args.large:,}: {again['wall_s']} s, peak RSS "
          f"{figures['nochange_rss_mb']} MB, {figures['nochange_api_calls']} API calls, "
          f"{again['files_unchanged']:,} files unchanged")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
