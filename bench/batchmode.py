"""Backfills at half price: N texts through the emulator in each mode, the interactive endpoint
under a per-minute quota, then a batch run killed with SIGKILL between submit and collect.

    python bench/batchmode.py [--n 20000] [--rpm 3000] [--window-s 15] [--json]
    python bench/batchmode.py --n 1000000 [--dims 768] [--upload-mb-per-s R]
                              [--download-mb-per-s R] [--json]
                                                                    # the throughput variant

Each run is a whole `embedpipe run` process. `interactive_quota_calls` is how many calls the
batch-mode run made against the interactive (per-minute quota) endpoint; `resumed_paid_twice`
is how many items the Batch API embedded more than once across the killed run and its resume.

The throughput variant (``--throughput``, and any N over 100,000, whose interactive run would
take hours under the quota) is one batch-mode run of N texts against an emulator whose jobs
finish at once: how many items a second its Batch API path prepares (requests into each job's
JSONL input), submits (upload and create) and collects (results read, rows handed to the
writer), from the run's own report; the items a minute prepared and collected together; the
run's peak RSS (its own, by ``wait4``); and whether every item is in the table once. With
``--upload-mb-per-s`` the emulator takes uploads in at that pace, as over a real link: the report
says how much of the uploads' time the routing waited for (a job is uploaded while the next one is
filled; before that, it waited for all of it). With ``--download-mb-per-s`` it sends the results
files at that pace, each download on its own (a link per connection): finished jobs are
collected by a task of their own while the next ones are filled (before that, the routing
collected them itself, and nothing was filled meanwhile), ``embed.batch.max_downloads`` (4)
at once (one at a time before 2026-12-07).
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

from bench.common import LAUNCHER, emulator_process, workdir, write_job
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
        "vectors").search().select(["id"]).limit(None).to_arrow()["id"].to_pylist()
    return ids


def _dup_lost(ids: list[str], expected: set[str]) -> tuple[int, int]:
    return len(ids) - len(set(ids)), len(expected - set(ids))


def throughput(n: int, dims: int, upload_mb_per_s: float | None = None,
               download_mb_per_s: float | None = None) -> dict[str, Any]:
    """One batch-mode run of ``n`` texts, jobs finished at once: its Batch API path's rates."""
    folder = workdir()
    try:
        made = time.perf_counter()
        make_text_corpus(folder / "src", n)
        made_s = time.perf_counter() - made
        link = ["--upload-mb-per-s", str(upload_mb_per_s)] if upload_mb_per_s else []
        link += ["--download-mb-per-s", str(download_mb_per_s)] if download_mb_per_s else []
        with emulator_process("--batch-delay-s", "0", *link) as base:
            (folder / "job").mkdir()
            job = write_job(folder / "job", folder / "src", {
                "provider": "gemini", "api_key": "k", "base_url": base,
                "model": "gemini-embedding-2", "output_dimensionality": dims, "mode": "batch",
                "batch": {"poll_initial_s": 0.2, "poll_max_s": 1}})
            report_path = folder / "report.json"
            proc = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m",
                                   "pipeline.cli", "run", "-q", "--report", str(report_path),
                                   str(job)], capture_output=True, text=True, check=True)
        launched = json.loads(proc.stdout.strip().splitlines()[-1])
        if not report_path.exists():  # the run ended before its report: say how, not FileNotFoundError
            raise SystemExit(f"the batch run exited {launched['code']} without a report:\n"
                             + "\n".join(proc.stderr.strip().splitlines()[-20:]))
        report = json.loads(report_path.read_text())
        ids = _ids(folder / "job")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    prepare, upload, collect = (report[f"batch_{k}_s"] for k in ("prepare", "upload", "collect"))
    items = report["items_batch"]
    return {
        "n": n, "dims": dims, "corpus_made_s": round(made_s, 1), "exit": launched["code"],
        "items_batch": items, "batch_jobs": report["batch_jobs"],
        "rows": len(ids), "duplicates": len(ids) - len(set(ids)), "lost": n - len(set(ids)),
        "prepare_s": round(prepare, 2), "upload_s": round(upload, 2),
        "collect_s": round(collect, 2), "upload_mb_per_s": upload_mb_per_s,
        "download_mb_per_s": download_mb_per_s,
        "upload_waited_s": round(report["batch_upload_wait_s"], 2),
        "prepare_items_per_s": round(items / prepare) if prepare else None,
        "upload_items_per_s": round(items / upload) if upload else None,
        "collect_items_per_s": round(items / collect) if collect else None,
        "prepared_and_collected_per_min": (round(items / (prepare + collect) * 60)
                                           if prepare + collect else None),
        "run_wall_s": round(launched["wall_s"], 1), "run_items_per_s": round(n / launched["wall_s"]),
        "peak_rss_mb": round(launched["maxrss_kb"] / 1024),
    }


def print_throughput(f: dict[str, Any]) -> None:
    print(f"{f['n']:,} texts, {f['dims']} dimensions, batch mode, jobs finished at once "
          f"({f['batch_jobs']} jobs; the corpus took {f['corpus_made_s']} s to write)")
    print(f"{'':12}{'seconds':>10}{'items/s':>12}")
    for phase in ("prepare", "upload", "collect"):
        print(f"{phase:12}{f[phase + '_s']:>10}{f[phase + '_items_per_s']:>12,}")
    link = f"{f['upload_mb_per_s']} MB/s" if f["upload_mb_per_s"] else "no limit"
    print(f"uploads ({link}): {f['upload_s']} s, of which the routing waited {f['upload_waited_s']} "
          "s (it waited for all of it when it submitted jobs itself)")
    if f["download_mb_per_s"]:
        print(f"downloads at {f['download_mb_per_s']} MB/s: collecting took {f['collect_s']} s")
    print(f"prepared and collected: {f['prepared_and_collected_per_min']:,} items a minute "
          f"(target 1,000,000); peak RSS {f['peak_rss_mb']} MB (target 1,024)")
    print(f"the whole run (list, validate, batch, write): {f['run_wall_s']} s, "
          f"{f['run_items_per_s']:,} items/s, exit {f['exit']}; rows {f['rows']:,}, "
          f"duplicates {f['duplicates']}, lost {f['lost']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rpm", type=int, default=3000)
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help="its PDFs and images join the texts (skipped if absent)")
    parser.add_argument("--throughput", action="store_true",
                        help="only the batch run's rates (implied for --n over 100,000)")
    parser.add_argument("--dims", type=int, default=768, help="of the throughput variant")
    parser.add_argument("--upload-mb-per-s", type=float, default=None,
                        help="of the throughput variant: the emulator's upload link")
    parser.add_argument("--download-mb-per-s", type=float, default=None,
                        help="of the throughput variant: the emulator's download link")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.throughput or args.n > 100_000:
        figures = throughput(args.n, args.dims, args.upload_mb_per_s, args.download_mb_per_s)
        print_throughput(figures)
        if args.json:
            print(json.dumps(figures))
        return 0
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
