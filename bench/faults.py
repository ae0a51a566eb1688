"""A run through a misbehaving service: every item must still be embedded exactly once.

    python bench/faults.py [--texts 2000] [--json]

The emulator (in this process) answers 10% of calls with 5xx, 5% with a per-minute 429, cuts
2% of connections mid-response and truncates 1% of bodies, at 50 ms latency. The same corpus
is run against a clean emulator for the baseline. Calls carry 10 items, so a 2,000-file run
makes ~200 calls and meets each fault many times. Prints items embedded vs expected, duplicate
and missing ids in the table, retries, and wall time beside the clean run's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import lancedb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import run, workdir, write_job
from pipeline.commands.sample_files import make_text_corpus
from pipeline.emulator.server import Emulator, EmulatorOptions

BATCH = 10  # small calls, so the fault rates show up hundreds of times


def one_run(folder: Path, src: Path, emulator: Emulator, name: str) -> dict:
    out = folder / name
    out.mkdir()
    job = write_job(out, src, {"provider": "gemini", "api_key": "any-key", "base_url": emulator.base_url,
                               "model": "gemini-embedding-2", "output_dimensionality": 128,
                               "max_attempts": 12, "timeout_s": 10,
                               "batch_size": BATCH})
    timed = run(job)
    table = lancedb.connect(str(out / "lance")).open_table("vectors").to_arrow()
    ids = table["id"].to_pylist()
    keys = set(table["key"].to_pylist())
    return {"wall_s": round(timed.wall_s, 2), "rows": len(ids),
            "duplicates": len(ids) - len(set(ids)), "keys": keys,
            "retries": timed.result.stats.retries, "http_429": timed.result.stats.http_429,
            "exit_code": timed.result.exit_code}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = workdir()
    src = folder / "src"
    files = make_text_corpus(src, args.texts)
    expected = {str(p.relative_to(src)) for p in files}
    try:
        with Emulator(EmulatorOptions(latency_ms=50)) as clean_emu:
            clean = one_run(folder, src, clean_emu, "clean")
        faulty_options = EmulatorOptions(latency_ms=50, error_429=0.05, error_500=0.05,
                                         error_503=0.05, reset=0.02, truncate=0.01, seed=11)
        with Emulator(faulty_options) as emu:
            faulty = one_run(folder, src, emu, "faults")
            served = emu.state.stats.as_dict()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lost = len(expected - faulty["keys"])
    figures = {"expected": len(expected), "embedded": faulty["rows"],
               "duplicates": faulty["duplicates"], "lost": lost,
               "retries": faulty["retries"], "http_429": faulty["http_429"],
               "faults_served": served["faults"], "wall_s": faulty["wall_s"],
               "clean_wall_s": clean["wall_s"], "clean_embedded": clean["rows"],
               "exit_code": faulty["exit_code"]}
    print(f"{'':26}{'with faults':>14}{'clean':>10}")
    print(f"{'items embedded / expected':26}{faulty['rows']:>9}/{len(expected):<4}"
          f"{clean['rows']:>6}/{len(expected)}")
    print(f"{'duplicate ids':26}{faulty['duplicates']:>14}{clean['duplicates']:>10}")
    print(f"{'lost files':26}{lost:>14}{len(expected - clean['keys']):>10}")
    print(f"{'retries (429s)':26}{faulty['retries']:>9} ({faulty['http_429']}){clean['retries']:>10}")
    print(f"{'wall s':26}{faulty['wall_s']:>14}{clean['wall_s']:>10}")
    print(f"faults served: {served['faults']}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
