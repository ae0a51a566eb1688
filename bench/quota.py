"""Does a run use the whole quota without a 429? Two scenarios against the emulator (latency
~100 ms), each stopped after 66 s: one bound by requests/min, one by tokens/min, with the job's quota set to
the server's.

    python bench/quota.py [--rpm 600] [--tpm 60000] [--json]

Utilisation is what the server served in the 60 s window starting 5 s after the first call,
divided by what the quota allows in 60 s (a sliding window: the first minute's burst has
expired by then, and the run has more items than the quota lets through, so the window is busy
throughout).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import run, workdir, write_job
from pipeline.commands.sample_files import make_text_corpus
from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.models import text_tokens

RUN_S = 66.0  # the run is stopped then: the 60 s window [5 s, 65 s) stays busy throughout


def window_share(timeline: list[tuple[float, int, int]], start_after: float = 5.0,
                 span: float = 60.0) -> tuple[int, int]:
    t0 = timeline[0][0] + start_after
    inside = [(n, tok) for t, n, tok in timeline if t0 <= t < t0 + span]
    return sum(n for n, _ in inside), sum(tok for _, tok in inside)


def scenario(name: str, rpm: int | None, tpm: int | None, items: int, words: int) -> dict:
    folder = workdir()
    make_text_corpus(folder / "src", items, words=words)
    options = EmulatorOptions(rpm=rpm, tpm=tpm, latency_ms=100, jitter_ms=20)
    with Emulator(options) as emu:
        job = write_job(folder, folder / "src", {
            "provider": "gemini", "api_key": "any-key",
            "base_url": emu.base_url, "model": "gemini-embedding-2",
            "output_dimensionality": 128, "concurrency": 8,
            "quota": {k: v for k, v in (("rpm", rpm), ("tpm", tpm)) if v}})
        timed = run(job, stop_after_s=RUN_S)
        stats = emu.state.stats
        served_items, served_tokens = window_share(list(stats.timeline))
        out = {
            "scenario": name, "items": items, "wall_s": round(timed.wall_s, 1),
            "rpm_ratio": round(served_items / rpm, 3) if rpm else None,
            "tpm_ratio": round(served_tokens / tpm, 3) if tpm else None,
            "http_429": stats.by_status.get("429", 0),
            "embedded": timed.result.stats.items_embedded,
        }
    shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--tpm", type=int, default=60_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # More than fits in the run, so the quota, not the corpus, is what limits it.
    rpm_run = scenario("rpm-bound", args.rpm, None, items=args.rpm * 3, words=12)
    tpm_words = 60  # ~ 100 tokens an item: tokens, not requests, bind
    probe_dir = workdir()
    sample = make_text_corpus(probe_dir, 50, words=tpm_words)
    per_item = sum(text_tokens(p.read_text()) for p in sample) / len(sample)
    shutil.rmtree(probe_dir, ignore_errors=True)
    tpm_run = scenario("tpm-bound", args.rpm * 100, args.tpm,
                       items=int(args.tpm * 3 / per_item), words=tpm_words)
    print(f"{'scenario':12}{'items':>8}{'wall s':>9}{'req used/allowed':>19}"
          f"{'tok used/allowed':>19}{'429s':>6}")
    for r in (rpm_run, tpm_run):
        print(f"{r['scenario']:12}{r['items']:>8}{r['wall_s']:>9}{r['rpm_ratio'] or '-':>19}"
              f"{r['tpm_ratio'] or '-':>19}{r['http_429']:>6}")
    if args.json:
        print(json.dumps({"rpm_ratio": rpm_run["rpm_ratio"], "tpm_ratio": tpm_run["tpm_ratio"],
                          "http_429": rpm_run["http_429"] + tpm_run["http_429"],
                          "scenarios": [rpm_run, tpm_run]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
