"""Backfills at half price: N texts through the emulator in each mode, the interactive endpoint
under a per-minute quota, then a batch run killed with SIGKILL between submit and collect.

    python bench/batchmode.py [--n 20000] [--rpm 3000] [--window-s 15] [--json]

Each run is a whole `embedpipe run` process. `interactive_quota_calls` is how many calls the
batch-mode run made against the interactive (per-minute quota) endpoint; `resumed_paid_twice`
is how many items the Batch API embedded more than once across the killed run and its resume.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import lancedb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emulator_process, workdir, write_job
from pipeline.commands.sample_files import make_text_corpus

MAX_REQUESTS = 5000
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def _stats(base: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(base + "/emulator/stats").json()
    return stats


def _run(job: Path) -> tuple[float, int, dict[str, Any]]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-q", "--report", "-",
                           str(job)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout \
        else {}
    return wall, proc.returncode, report


def _ids(folder: Path) -> list[str]:
    ids: list[str] = lancedb.connect(str(folder / "lance")).open_table(
        "vectors").to_arrow()["id"].to_pylist()
    return ids


def _dup_lost(ids: list[str], expected: set[str]) -> tuple[int, int]:
    return len(ids) - len(set(ids)), len(expected - set(ids))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rpm", type=int, default=3000)
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help="its PDFs and images join the texts (skipped if absent)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = workdir()
    src = folder / "src"
    make_text_corpus(src, args.n)
    media = 0
    for sub, pattern in (("pdf", "*.pdf"), ("image", "*.png"), ("image", "*.jpg")):
        for path in sorted((args.corpus / sub).glob(pattern)) if args.corpus.is_dir() else ():
            (src / "corpus").mkdir(exist_ok=True)
            shutil.copyfile(path, src / "corpus" / path.name)
            media += 1
    try:
        with emulator_process("--rpm", str(args.rpm), "--window-s", str(args.window_s),
                              "--latency-ms", "100", "--batch-delay-s", "5") as base:
            def job(name: str, mode: str) -> Path:
                (folder / name).mkdir()
                return write_job(folder / name, src, {
                    "provider": "gemini", "api_key": "k", "base_url": base,
                    "model": "gemini-embedding-2", "output_dimensionality": 128, "mode": mode,
                    "batch": {"max_requests": MAX_REQUESTS, "poll_initial_s": 1,
                              "poll_max_s": 5}})

            i_wall, i_code, i_report = _run(job("interactive", "interactive"))
            before = _stats(base)
            b_wall, b_code, b_report = _run(job("batch", "batch"))
            after = _stats(base)
            quota_calls = (after["embed_calls"] + after["batch_calls"]
                           - before["embed_calls"] - before["batch_calls"])
            # Killed once every job is submitted and none is finished, then run again.
            killed = job("killed", "batch")
            start_items = _stats(base)["batch_items"]
            start_jobs = _stats(base)["batch_jobs"]
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-q",
                                     str(killed)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            jobs = -(-i_report["items_embedded"] // MAX_REQUESTS)
            while _stats(base)["batch_jobs"] - start_jobs < jobs and proc.poll() is None:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            r_wall, r_code, _ = _run(killed)
            paid = _stats(base)["batch_items"] - start_items
        expected = set(_ids(folder / "interactive"))  # the same items, embedded interactively
        i_dup, _ = _dup_lost(_ids(folder / "interactive"), expected)
        b_dup, b_lost = _dup_lost(_ids(folder / "batch"), expected)
        r_dup, r_lost = _dup_lost(_ids(folder / "killed"), expected)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    figures = {
        "n": args.n, "media_files": media, "items": len(expected),
        "interactive_wall_s": round(i_wall, 1), "batch_wall_s": round(b_wall, 1),
        "interactive_cost_usd": i_report.get("cost_usd"), "batch_cost_usd": b_report.get("cost_usd"),
        "interactive_exit": i_code, "batch_exit": b_code, "interactive_http_429":
            i_report.get("http_429"), "interactive_quota_calls": quota_calls,
        "duplicates": i_dup + b_dup, "lost": b_lost,
        "batch_items_interactive_fallback": b_report.get("items_fallback"),
        "resumed_exit": r_code, "resumed_wall_s": round(r_wall, 1),
        "resumed_duplicates": r_dup, "resumed_lost": r_lost,
        "resumed_paid_twice": paid - len(expected),
    }
    print(f"{args.n:,} texts and {media} corpus PDFs and images ({len(expected):,} items); "
          f"interactive endpoint quota {args.rpm} requests per "
          f"{args.window_s:g} s")
    print(f"{'':24}{'interactive':>14}{'batch':>14}")
    print(f"{'wall s':24}{figures['interactive_wall_s']:>14}{figures['batch_wall_s']:>14}")
    print(f"{'cost USD':24}{figures['interactive_cost_usd']:>14}{figures['batch_cost_usd']:>14}")
    print(f"batch mode: {quota_calls} calls against the interactive quota; duplicates "
          f"{figures['duplicates']}, lost {figures['lost']}")
    print(f"killed after submitting, then resumed: exit {r_code}, paid twice "
          f"{figures['resumed_paid_twice']}, duplicates {r_dup}, lost {r_lost}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
