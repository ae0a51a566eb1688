"""embedpipe against what users write without it, on the same corpus and the same emulator.

    python bench/peers.py [--texts 3000] [--images 40] [--latency-ms 100] [--per-item-ms 3] [--json]

Each contender runs in its own process, one after another, against a fresh emulator in a process
of its own (no quota; latency = fixed + per item, like a real batch call; fresh, so that none
profits from the caches another warmed):

- embedpipe: ``embedpipe run`` on a job with default settings (the time includes validation and
  writing the Lance table);
- sequential: one ``embed_content`` call per file with the google-genai SDK, as in Google's and
  gateways' quickstarts (run on a sample of the files: it is slow);
- sdk-async: the SDK's async client, batches of 100 with 8 calls in flight (asyncio.Semaphore),
  as a careful user would write it (nothing is stored).

Prints items/s for each and the ratios; with --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emulator_process, workdir, write_job
from pipeline.samples import make_quickstart_media, make_text_corpus

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


def emulator(args: argparse.Namespace) -> contextlib.AbstractContextManager[str]:
    """A fresh emulator (no quota; latency = fixed + per item)."""
    return emulator_process("--latency-ms", str(args.latency_ms),
                            "--per-item-ms", str(args.per_item_ms))


def timed(cmd: list[str]) -> tuple[float, float]:
    """(items, seconds) as the script prints them on its last line."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:2]} failed:\n{proc.stderr[-3000:]}")
    items, seconds = proc.stdout.strip().splitlines()[-1].split()
    return float(items), float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--per-item-ms", type=float, default=3)
    parser.add_argument("--sequential-sample", type=int, default=150)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    folder = workdir()
    src = folder / "src"
    make_text_corpus(src / "texts", args.texts, words=40)
    media = make_quickstart_media(folder / "media")
    images = [m for m in media if m.suffix in (".png", ".jpg")]
    for i in range(args.images):
        shutil.copyfile(images[i % len(images)], src / f"img-{i:04d}{images[i % len(images)].suffix}")
        # make each image distinct so no cache could help anyone
        with open(src / f"img-{i:04d}{images[i % len(images)].suffix}", "ab") as f:
            f.write(i.to_bytes(4, "big"))
    total = args.texts + args.images

    job_root = folder / "job"
    job_root.mkdir()
    report = folder / "report.json"
    try:
        # Each contender gets a fresh emulator: none profits from caches another one warmed.
        with emulator(args) as base:
            job = write_job(job_root, src, {"provider": "gemini", "api_key": "any-key", "base_url": base,
                                            "model": "gemini-embedding-2",
                                            "output_dimensionality": 768})
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-q", "--report",
                            str(report), str(job)], check=False, env={**os.environ})
            ep_process_s = time.perf_counter() - t0
        ep = json.loads(report.read_text())
        ep_s = ep["wall_s"]  # the run itself, like the scripts' own timers
        with emulator(args) as base:
            seq_items, seq_s = timed([sys.executable, "-c", SEQUENTIAL, base, str(src),
                                      str(args.sequential_sample)])
        with emulator(args) as base:
            sdk_items, sdk_s = timed([sys.executable, "-c", SDK_ASYNC, base, str(src)])
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    figures = {
        "items": total,
        "embedpipe_embedded": ep["items_embedded"],
        "embedpipe_items_per_s": round(ep["items_embedded"] / ep_s, 1),
        "embedpipe_with_process_start_items_per_s": round(ep["items_embedded"] / ep_process_s, 1),
        "sdk_items_per_s": round(sdk_items / sdk_s, 1),
        "sequential_items_per_s": round(seq_items / seq_s, 1),
    }
    figures["embedpipe_vs_sdk"] = round(figures["embedpipe_items_per_s"] / figures["sdk_items_per_s"], 2)
    figures["embedpipe_vs_sequential"] = round(
        figures["embedpipe_items_per_s"] / figures["sequential_items_per_s"], 1)
    print(f"{total} items ({args.texts} texts, {args.images} images); emulator latency "
          f"{args.latency_ms:g} ms + {args.per_item_ms:g} ms/item")
    print(f"{'embedpipe (validate, embed, write Lance)':48}{figures['embedpipe_items_per_s']:>10} items/s")
    print(f"{'  the same, counting process start and imports':48}"
          f"{figures['embedpipe_with_process_start_items_per_s']:>10} items/s")
    print(f"{'google-genai async, 100/batch, 8 in flight':48}{figures['sdk_items_per_s']:>10} items/s")
    print(f"{'sequential, one call per file':48}{figures['sequential_items_per_s']:>10} items/s")
    print(f"embedpipe / sdk = {figures['embedpipe_vs_sdk']}x; "
          f"embedpipe / sequential = {figures['embedpipe_vs_sequential']}x")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
