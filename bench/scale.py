"""Nightly runs over millions of objects: wall time, peak memory and API calls.

    python bench/scale.py [--n 1000000] [--n 10000000] [--changed 0.01] [--json]

For each N: a ``synthetic`` source of N small texts (no files: names, sizes and versions are
computed), and a manifest of N files written as if a first night had embedded them all (a real
first night would take N / 2,500 seconds of emulator calls; the vectors table holds only what the
measured nights write). Then two nights, each ``embedpipe run`` as a whole process against the
emulator (interactive calls, as nights under the Batch API threshold make them):

- no change: the source as the manifest knows it (0 API calls expected);
- changed: the source one generation later, with ``--changed`` of the objects changed.

Peak RSS is the run process's own (``wait4`` in a small launcher: see ``LAUNCHER``), wall time
from its start to its exit. With --json
the last line is one JSON object: ``{"runs": [...], "rss_10m_over_1m": ...}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lancedb
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from bench.common import LAUNCHER, emulator_process, workdir
from connectors.synthetic import SyntheticConnector
from pipeline.config import load_job
from pipeline.state.manifest import EMBEDDED, MANIFEST_SCHEMA, Manifest


def job_file(folder: Path, n: int, generation: int, changed: float, base: str) -> Path:
    job = {"name": "scale",
           "source": {"kind": "synthetic", "count": n, "generation": generation,
                      "changed": changed},
           "embed": {"provider": "gemini", "api_key": "bench", "base_url": base,
                     "model": "gemini-embedding-2", "output_dimensionality": 768,
                     "mode": "interactive"},
           "sink": {"kind": "lance", "uri": str(folder / "lance")}}
    path = folder / f"job-{generation}.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


def seed_manifest(job_path: Path) -> float:
    """The manifest a first night over the source would have left (every file embedded)."""
    started = time.perf_counter()
    job = load_job(job_path)
    connector = SyntheticConnector(job.source)  # type: ignore[arg-type]
    fingerprint, now = job.fingerprint(), pa.scalar(time.time_ns() // 1000,
                                                    pa.timestamp("us", tz="UTC"))

    def batches() -> Any:
        for listed in connector.list_batches():
            n = listed.num_rows
            yield pa.RecordBatch.from_arrays([
                listed.column("uri"), listed.column("key"), listed.column("version"),
                listed.column("size"), listed.column("mtime"),
                pa.array([fingerprint] * n), pa.array([EMBEDDED] * n),
                pa.array([1] * n, pa.int32()), pa.array([0] * n, pa.int32()),
                pa.nulls(n, pa.string()), pa.nulls(n, pa.string()), pa.array(["seed"] * n),
                pc.cast(pa.array([now.value] * n, pa.int64()), pa.timestamp("us", tz="UTC")),
            ], schema=MANIFEST_SCHEMA)

    db = lancedb.connect(job.sink.state_uri)
    db.create_table(job.sink.manifest_table,
                    pa.RecordBatchReader.from_batches(MANIFEST_SCHEMA, batches()))
    Manifest(db, job.sink.manifest_table).upkeep()  # the uri index a real run's end builds
    return time.perf_counter() - started


def night(job_path: Path, report: Path) -> dict[str, Any]:
    """``embedpipe run`` as a whole process: wall s, peak RSS MB, and what its report says."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "pipeline.cli",
                           "run", "-q", "--report", str(report), str(job_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SystemExit(f"launcher failed: {proc.stderr[-3000:]}")
    ran = json.loads(proc.stdout.strip().splitlines()[-1])
    if ran["code"] != 0:
        raise SystemExit(f"run failed ({ran['code']}): {proc.stderr[-3000:]}")
    out = json.loads(report.read_text())
    return {"wall_s": round(ran["wall_s"], 1), "peak_rss_mb": round(ran["maxrss_kb"] / 1024),
            "api_calls": out["api_calls"], "files_changed": out["files_changed"],
            "files_unchanged": out["files_unchanged"], "items_embedded": out["items_embedded"]}


def measure(n: int, changed: float) -> dict[str, Any]:
    folder = workdir()
    try:
        with emulator_process("--latency-ms", "20") as base:
            first = job_file(folder, n, 0, changed, base)
            seed_s = seed_manifest(first)
            nochange = night(first, folder / "nochange.json")
            later = night(job_file(folder, n, 1, changed, base), folder / "changed.json")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"n": n, "seed_s": round(seed_s, 1),
            **{f"nochange_{k}": v for k, v in nochange.items()},
            **{f"changed_{k}": v for k, v in later.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, action="append",
                        help="objects in the source (repeatable; default 1000000)")
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = [measure(n, args.changed) for n in (args.n or [1_000_000])]

    print(f"{'objects':>12}{'night':>10}{'wall s':>9}{'peak RSS MB':>13}{'API calls':>11}"
          f"{'changed':>9}{'unchanged':>12}")
    for r in runs:
        for night_name in ("nochange", "changed"):
            print(f"{r['n']:>12,}{night_name:>10}{r[night_name + '_wall_s']:>9}"
                  f"{r[night_name + '_peak_rss_mb']:>13}{r[night_name + '_api_calls']:>11}"
                  f"{r[night_name + '_files_changed']:>9,}{r[night_name + '_files_unchanged']:>12,}")
    figures: dict[str, Any] = {"runs": runs}
    by_n = {r["n"]: r for r in runs}
    if 1_000_000 in by_n and 10_000_000 in by_n:
        peak = {k: max(by_n[k]["nochange_peak_rss_mb"], by_n[k]["changed_peak_rss_mb"])
                for k in (1_000_000, 10_000_000)}
        figures["rss_10m_over_1m"] = round(peak[10_000_000] / peak[1_000_000], 2)
        print(f"peak RSS at 10M / at 1M = {figures['rss_10m_over_1m']} (target <= 1.3; "
              "10M <= 1,500 MB; no-change night at 10M <= 600 s)")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
