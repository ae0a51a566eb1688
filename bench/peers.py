"""embedpipe against what users write without it, on the same corpus and the same emulator.

    python bench/peers.py [--texts 20000] [--images 0] [--latency-ms 100] [--per-item-ms 3]
                          [--cpu-bound] [--json]

Each contender runs as a whole process, timed from interpreter start to exit, one after another,
against a fresh emulator in a process of its own (no quota; latency = fixed + per item, like a
real batch call; fresh, so that none profits from the caches another warmed):

- embedpipe: ``embedpipe run`` on a job with default settings but ``mode: interactive`` (the
  calls the SDK makes; ``auto`` would send 20,000 texts to the Batch API) over the texts as
  files on disk (the time includes listing, validation and writing the Lance table);
- sdk-async: the SDK's async client, batches of 100 with 8 calls in flight (asyncio.Semaphore),
  as a careful user would write it (reads the same files; nothing is stored);
- sequential: one ``embed_content`` call per file with the google-genai SDK, as in Google's and
  gateways' quickstarts (run on a sample of the files, by its own timer: it is slow).

With ``--cpu-bound``, embedpipe and the SDK script run once more against an emulator that
answers at once (no latency): the case where the CPU, not the wire, is the limit.

Besides items/s, prints the CPU-seconds each spent per 1,000 items beyond start-up (the CPU of
the process minus that of a process that only starts and imports what the contender imports).
With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emulator_process, workdir, write_job
from pipeline.commands.sample_files import make_quickstart_media, make_text_corpus

SEQUENTIAL = r"""
import sys, time
from pathlib import Path
from google import genai
from google.genai import types
base, root, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
client = genai.Client(api_key="bench", http_options=types.HttpOptions(base_url=base))
files = sorted(p for p in root.rglob("*") if p.is_file())[:limit]
t0 = time.perf_counter()
for path in files:
    if path.suffix == ".txt":
        content = path.read_text()
    else:
        content = types.Part.from_bytes(data=path.read_bytes(), mime_type="image/png"
                                        if path.suffix == ".png" else "image/jpeg")
    client.models.embed_content(model="gemini-embedding-2", contents=content,
                                config=types.EmbedContentConfig(output_dimensionality=768))
print(len(files), time.perf_counter() - t0)
"""

SDK_ASYNC = r"""
import asyncio, sys, time
from pathlib import Path
from google import genai
from google.genai import types
base, root = sys.argv[1], Path(sys.argv[2])

def content(path):
    if path.suffix == ".txt":
        return types.Content(parts=[types.Part(text=path.read_text())])
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return types.Content(parts=[types.Part.from_bytes(data=path.read_bytes(), mime_type=mime)])

async def main():
    client = genai.Client(api_key="bench", http_options=types.HttpOptions(
        base_url=base, retry_options=types.HttpRetryOptions(attempts=8)))
    files = sorted(p for p in root.rglob("*") if p.is_file())
    gate = asyncio.Semaphore(8)
    async def batch(chunk):
        async with gate:
            result = await client.aio.models.embed_content(
                model="gemini-embedding-2", contents=[content(p) for p in chunk],
                config=types.EmbedContentConfig(output_dimensionality=768))
            return len(result.embeddings)
    t0 = time.perf_counter()
    done = await asyncio.gather(*(batch(files[i:i + 100]) for i in range(0, len(files), 100)))
    print(sum(done), time.perf_counter() - t0)

asyncio.run(main())
"""


def emulator(latency_ms: float, per_item_ms: float) -> contextlib.AbstractContextManager[str]:
    """A fresh emulator (no quota; latency = fixed + per item)."""
    return emulator_process("--latency-ms", str(latency_ms), "--per-item-ms", str(per_item_ms))


@dataclass
class Proc:
    """A contender's whole process: wall seconds from start to exit, CPU seconds, its stdout."""

    wall_s: float
    cpu_s: float
    out: str


def whole(cmd: list[str]) -> Proc:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Proc(wall, cpu, proc.stdout)


def startup_cpu(code: str) -> float:
    """CPU seconds of a process that only starts and imports (the least of three)."""
    return min(whole([sys.executable, "-c", code]).cpu_s for _ in range(3))


# What `embedpipe run` imports before its first file: its stack, Lance (the sink) and DuckDB
# (the manifest). Until 2026-12-06 lancedb and duckdb were left out, which counted ~1.1 CPU-s
# of imports as per-item work (0.055 CPU-s per 1,000 of 20,000 items).
EMBEDPIPE_START = ("from pipeline.cli import main; import pipeline.run, pipeline.stages.validation, "
                   "lancedb, duckdb")
SDK_START = "import asyncio; from google import genai; from google.genai import types"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--images", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--per-item-ms", type=float, default=3)
    parser.add_argument("--sequential-sample", type=int, default=150)
    parser.add_argument("--cpu-bound", action="store_true",
                        help="also both contenders against an emulator with no latency")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    folder = workdir()
    src = folder / "src"
    make_text_corpus(src / "texts", args.texts, words=40)
    if args.images:
        media = make_quickstart_media(folder / "media")
        images = [m for m in media if m.suffix in (".png", ".jpg")]
        for i in range(args.images):
            target = src / f"img-{i:04d}{images[i % len(images)].suffix}"
            shutil.copyfile(images[i % len(images)], target)
            with open(target, "ab") as f:  # each image distinct: no cache could help anyone
                f.write(i.to_bytes(4, "big"))
    total = args.texts + args.images

    job_root = folder / "job"
    report = folder / "report.json"
    def pair(latency_ms: float, per_item_ms: float) -> tuple[Proc, dict[str, Any], Proc]:
        """embedpipe, then the SDK script, each against a fresh emulator."""
        shutil.rmtree(job_root, ignore_errors=True)
        job_root.mkdir()
        with emulator(latency_ms, per_item_ms) as base:
            job = write_job(job_root, src, {"provider": "gemini", "api_key": "any-key",
                                            "base_url": base, "model": "gemini-embedding-2",
                                            "output_dimensionality": 768,
                                            # the SDK's calls are interactive: so are these
                                            # (auto would take 20,000 texts to the Batch API)
                                            "mode": "interactive"})
            ep = whole([sys.executable, "-m", "pipeline.cli", "run", "-q", "--report",
                        str(report), str(job)])
        with emulator(latency_ms, per_item_ms) as base:
            sdk = whole([sys.executable, "-c", SDK_ASYNC, base, str(src)])
        return ep, json.loads(report.read_text()), sdk

    try:
        ep, ep_report, sdk = pair(args.latency_ms, args.per_item_ms)
        # the CPU-bound case: an endpoint that answers at once
        fast = pair(0, 0) if args.cpu_bound else None
        with emulator(args.latency_ms, args.per_item_ms) as base:
            seq = whole([sys.executable, "-c", SEQUENTIAL, base, str(src),
                         str(args.sequential_sample)])
        ep_start, sdk_start = startup_cpu(EMBEDPIPE_START), startup_cpu(SDK_START)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    ep_items = ep_report["items_embedded"]
    sdk_items = float(sdk.out.strip().splitlines()[-1].split()[0])
    seq_items, seq_s = (float(x) for x in seq.out.strip().splitlines()[-1].split())
    figures = {
        "items": total,
        "embedpipe_embedded": ep_items,
        "sdk_embedded": int(sdk_items),
        "embedpipe_items_per_s": round(ep_items / ep.wall_s, 1),
        "sdk_items_per_s": round(sdk_items / sdk.wall_s, 1),
        "embedpipe_process_s": round(ep.wall_s, 2),
        "sdk_process_s": round(sdk.wall_s, 2),
        "embedpipe_cpu_s_per_1000": round((ep.cpu_s - ep_start) / ep_items * 1000, 3),
        "sdk_cpu_s_per_1000": round((sdk.cpu_s - sdk_start) / sdk_items * 1000, 3),
        "embedpipe_startup_cpu_s": round(ep_start, 2),
        "sdk_startup_cpu_s": round(sdk_start, 2),
        "embedpipe_run_items_per_s": round(ep_items / ep_report["wall_s"], 1),
        "sequential_items_per_s": round(seq_items / seq_s, 1),
    }
    figures["embedpipe_vs_sdk"] = round(figures["embedpipe_items_per_s"]
                                        / figures["sdk_items_per_s"], 2)
    if fast is not None:
        fast_ep, fast_report, fast_sdk = fast
        fast_sdk_items = float(fast_sdk.out.strip().splitlines()[-1].split()[0])
        figures |= {
            "cpu_bound_embedpipe_items_per_s": round(fast_report["items_embedded"]
                                                     / fast_ep.wall_s, 1),
            "cpu_bound_sdk_items_per_s": round(fast_sdk_items / fast_sdk.wall_s, 1),
            "cpu_bound_embedpipe_cpu_s_per_1000": round(
                (fast_ep.cpu_s - ep_start) / fast_report["items_embedded"] * 1000, 3),
            "cpu_bound_sdk_cpu_s_per_1000": round(
                (fast_sdk.cpu_s - sdk_start) / fast_sdk_items * 1000, 3)}
        figures["cpu_bound_embedpipe_vs_sdk"] = round(
            figures["cpu_bound_embedpipe_items_per_s"] / figures["cpu_bound_sdk_items_per_s"], 2)
    figures["embedpipe_vs_sequential"] = round(
        figures["embedpipe_items_per_s"] / figures["sequential_items_per_s"], 1)
    print(f"{total} items ({args.texts} texts, {args.images} images); emulator latency "
          f"{args.latency_ms:g} ms + {args.per_item_ms:g} ms/item; whole processes")
    print(f"{'':46}{'items/s':>9}{'process s':>11}{'CPU s/1000':>12}{'start CPU s':>13}")
    for name, key in (("embedpipe run (list, validate, embed, Lance)", "embedpipe"),
                      ("google-genai async, 100/batch, 8 in flight", "sdk")):
        print(f"{name:46}{figures[key + '_items_per_s']:>9}{figures[key + '_process_s']:>11}"
              f"{figures[key + '_cpu_s_per_1000']:>12}{figures[key + '_startup_cpu_s']:>13}")
    print(f"{'sequential, one call per file (own timer)':46}{figures['sequential_items_per_s']:>9}")
    print(f"embedpipe / sdk = {figures['embedpipe_vs_sdk']}x (target 1.5x); embedpipe / "
          f"sequential = {figures['embedpipe_vs_sequential']}x; embedpipe's run by its own "
          f"timer: {figures['embedpipe_run_items_per_s']} items/s")
    if fast is not None:
        print("the CPU-bound case (an emulator that answers at once):")
        for name, key in (("embedpipe run", "embedpipe"), ("google-genai async", "sdk")):
            print(f"{name:46}{figures[f'cpu_bound_{key}_items_per_s']:>9}{'':>11}"
                  f"{figures[f'cpu_bound_{key}_cpu_s_per_1000']:>12}")
        print(f"embedpipe / sdk = {figures['cpu_bound_embedpipe_vs_sdk']}x (target 1.5x)")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
