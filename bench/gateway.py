"""A gateway that answers nothing but 429 (no RetryInfo, no Retry-After): how many calls does a
run with one batch send it, and when does it stop? Side by side with the old rule (a 429 costs
no attempt and waits up to 0.5 s with full jitter: what main did before the gateways issue),
simulated from the same clock, since running the old code would only hammer the emulator.

    python bench/gateway.py [--wait-s 600] [--json]

The real run uses the job's defaults (embed.max_quota_wait_s 600, backoff_base_s 1,
backoff_cap_s 60) against `embedpipe emulator --gateway new-api --rate-limit 1` in a process of
its own; it takes --wait-s seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emulator_process, run, workdir, write_job
from pipeline.commands.sample_files import make_text_corpus


def old_rule_calls(wait_s: float, seed: int = 1) -> int:
    """Calls under the old rule: each 429 waited uniform(0, 1 s * 2**0) (the exponent never grew)."""
    rng, spent, calls = random.Random(seed), 0.0, 1
    while spent < wait_s:
        spent += rng.uniform(0, 1.0)
        calls += 1
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wait-s", type=float, default=600.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = workdir()
    make_text_corpus(folder / "src", 30)  # one batch
    with emulator_process("--gateway", "new-api", "--api-key", "sk-bench", "--auth", "bearer",
                          "--rate-limit", "1") as url:
        job = write_job(folder, folder / "src", {
            "provider": "gemini", "base_url": url, "api_key": "sk-bench", "auth": "bearer",
            "model": "gemini-embedding-001", "output_dimensionality": 256,
            "max_quota_wait_s": args.wait_s})
        started = time.monotonic()
        timed = run(job)
    figures = {"date": time.strftime("%Y-%m-%d"), "wait_s": args.wait_s,
               "exit_code": timed.result.exit_code, "wall_s": round(time.monotonic() - started, 1),
               "calls": timed.result.stats.api_calls, "http_429": timed.result.stats.http_429,
               "throttled_s": round(timed.result.stats.throttled_s, 1),
               "rejects": timed.result.stats.rejects,
               "old_rule_calls_simulated": old_rule_calls(args.wait_s)}
    if args.json:
        print(json.dumps(figures))
        return
    print(f"gateway answering only 429 for {args.wait_s:.0f} s, one batch of 30 texts:")
    print(f"  now:      {figures['calls']} calls, exit {figures['exit_code']} after "
          f"{figures['wall_s']} s ({figures['throttled_s']} s throttled), "
          f"{figures['rejects']} rejects")
    print(f"  old rule: {figures['old_rule_calls_simulated']} calls (simulated: a retry every "
          "~0.5 s)")


if __name__ == "__main__":
    main()
