"""Object-store speed: list-and-diff of 10,000 objects and read throughput, beside boto3.

    python bench/s3.py [--objects 10000] [--read-mb 64] [--json]

Starts SeaweedFS (the dev dependency) on loopback, fills a bucket, then in one run:
- embedpipe: S3Connector listing + the manifest diff of a no-change night (listing only, the
  manifest says every object is unchanged), and reading objects through S3Connector;
- boto3: a paginated list_objects_v2 of the same prefix, and get_object reads of the same keys;
- obstore alone: a bare listing of the same prefix as Arrow (the floor of a listing), and the
  list + diff time per 100,000 objects beside it (the target: within 1.5x);
- a large video (``--video-mb``, default 1024: an H.264 MP4 made here, noise at about
  19 MB/s) embedded from the bucket by ``embedpipe run`` as a whole process against the
  emulator: its peak RSS (``wait4``) with the object streamed to a temporary file, beside the
  same run with the object held whole in memory (as before streaming), and the object's bytes
  the run fetched;
- ``embedpipe plan`` over the corpus's media (``../shared/corpus``: audio, video, images, PDFs,
  the bad ones too) in the bucket, read by range: the bytes it read against the objects' bytes
  (the target: at most 0.3), beside a plan of the same files on the local disk, and whether
  both plans predict the same items and rejects.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3

from bench.common import LAUNCHER, emulator_process
from connectors.s3 import S3Connector
from pipeline.config import S3SourceConfig
from pipeline.records import SourceObject
from pipeline.stages.companions import Companions
from pipeline.stages.listing import Listing
from pipeline.state.manifest import FileState
from pipeline.stats import RunStats
from tests.conftest import S3_KEY, S3_SECRET, S3Server, manifest_rows
from tests.test_object_stores import _put_many


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--read-mb", type=int, default=64)
    parser.add_argument("--video-mb", type=int, default=1024, help="0: no video run")
    parser.add_argument("--corpus", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "corpus")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = S3Server(Path(tempfile.mkdtemp(prefix="embedpipe-s3-bench-")))
    server.start()
    try:
        small = {f"list/{i:07d}.txt": b"x" * 100 for i in range(args.objects)}
        blob = bytes(range(256)) * 4096  # 1 MiB
        big = {f"read/{i:04d}.bin": blob for i in range(args.read_mb)}
        _put_many(server.store("big"), small | big)

        config = S3SourceConfig.model_validate(server.source("big", "list"))
        connector = S3Connector(config)
        fingerprint = "f"
        t = time.perf_counter()
        listed = list(connector.list())
        manifest = {o.uri: FileState(o.uri, o.key, o.version or "", o.size, o.mtime, fingerprint,
                                     "embedded", 1, 0, None)
                    for o in listed if isinstance(o, SourceObject)}
        first_list_s = time.perf_counter() - t
        t = time.perf_counter()
        stats = RunStats(run_id="bench")  # the listing stage of a run, as the engine drives it
        listing = Listing(connector, Companions(connector, None, None),
                          manifest_rows(manifest.values(), 65_536), len(manifest), fingerprint,
                          stats)
        while (chunk := listing.next_chunk()) is not None:
            listing.diff(chunk)
        unchanged = stats.files_unchanged
        list_diff_s = time.perf_counter() - t

        import obstore

        t = time.perf_counter()
        bare = sum(page.num_rows for page in obstore.list(
            server.store("big"), prefix="list/", chunk_size=1000, return_arrow=True))
        bare_list_s = time.perf_counter() - t

        client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=S3_KEY,
                              aws_secret_access_key=S3_SECRET, region_name="us-east-1")
        t = time.perf_counter()
        keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(
            Bucket="big", Prefix="list/") for obj in page.get("Contents", [])]
        boto3_list_s = time.perf_counter() - t

        reader = S3Connector(S3SourceConfig.model_validate(server.source("big", "read")))
        objs = [o for o in reader.list() if isinstance(o, SourceObject)]
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            read_bytes = sum(len(b) for b in pool.map(reader.read, objs))
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            boto_bytes = sum(pool.map(lambda k: len(client.get_object(Bucket="big", Key=k)[
                "Body"].read()), list(big)))
        boto3_read_s = time.perf_counter() - t
        video = big_video_runs(server, args.video_mb) if args.video_mb else {}
        media = plan_by_range(server, args.corpus) if args.corpus.is_dir() else {}
    finally:
        server.stop()
    figures = {
        "objects": len(listed), "unchanged": unchanged, "boto3_objects": len(keys),
        "list_diff_s": round(list_diff_s, 3), "first_list_s": round(first_list_s, 3),
        "boto3_list_s": round(boto3_list_s, 3), "obstore_list_s": round(bare_list_s, 3),
        "list_diff_s_per_100k": round(list_diff_s * 100_000 / max(len(listed), 1), 3),
        "obstore_list_s_per_100k": round(bare_list_s * 100_000 / max(bare, 1), 3),
        "list_diff_vs_obstore": round(list_diff_s / bare_list_s, 2),
        "read_mb_per_s": round(read_bytes / 2**20 / read_s, 1),
        "boto3_read_mb_per_s": round(boto_bytes / 2**20 / boto3_read_s, 1),
        **video, **media,
    }
    print(f"{'':36}{'embedpipe':>12}{'boto3':>12}")
    print(f"{f'list {args.objects:,} objects (+ diff), s':36}{figures['list_diff_s']:>12}"
          f"{figures['boto3_list_s']:>12}")
    print(f"{f'read {args.read_mb} x 1 MiB, 8 threads, MB/s':36}{figures['read_mb_per_s']:>12}"
          f"{figures['boto3_read_mb_per_s']:>12}")
    print(f"list + diff per 100k objects {figures['list_diff_s_per_100k']} s vs a bare obstore "
          f"Arrow listing {figures['obstore_list_s_per_100k']} s: "
          f"{figures['list_diff_vs_obstore']}x")
    print(f"unchanged by the diff: {unchanged:,} of {len(listed):,}")
    if video:
        print(f"a {video['video_mb']:,} MB video from the bucket, peak RSS of the run: "
              f"{video['video_rss_mb_streamed']:,} MB streamed to disk, "
              f"{video['video_rss_mb_whole']:,} MB held whole ({video['video_items']} items, "
              f"exit {video['video_exit_streamed']}/{video['video_exit_whole']}, "
              f"{video['video_s_streamed']} s / {video['video_s_whole']} s); plan read "
              f"{video['video_plan_read_mb']} MB of it by range in {video['video_plan_s']} s "
              f"and predicted {video['video_plan_items']} items")
    if media:
        print(f"plan over {media['plan_files']} media files in the bucket ({media['plan_mb']} MB): "
              f"read {media['plan_read_mb']} MB by range = {media['plan_read_ratio']} of their "
              f"bytes in {media['plan_s_range']} s (local plan {media['plan_s_local']} s); "
              f"same items and rejects as the local plan: {media['plan_same_as_local']}")
        if not media["plan_same_as_local"]:
            print(f"  by range: {media['plan_by_range']}\n  local:    {media['plan_local']}")
    if args.json:
        print(json.dumps(figures))
    return 0


def plan_by_range(server: S3Server, corpus: Path) -> dict[str, Any]:
    """``plan`` over the corpus's media in the bucket (read by range) and on the local disk."""
    from pipeline.commands.planner import make_plan
    from pipeline.config import JobConfig

    files = {f"media/{p.relative_to(corpus)}": p for p in sorted(corpus.rglob("*"))
             if p.is_file() and p.parent != corpus}
    _put_many(server.store("big"), {k: p.read_bytes() for k, p in files.items()})
    folder = Path(tempfile.mkdtemp(prefix="embedpipe-s3-plan-"))
    try:
        embed = {"provider": "gemini", "api_key": "bench", "model": "gemini-embedding-2",
                 "output_dimensionality": 128}
        plans = {}
        times = {}
        for name, source in (("range", server.source("big", "media")),
                             ("local", {"kind": "local", "root": str(corpus),
                                        "exclude": ["*", "**/*.md", "**/*.tsv"]})):
            job = JobConfig.model_validate({
                "name": f"plan-{name}", "source": source, "embed": embed,
                "sink": {"kind": "lance", "uri": str(folder / name)}})
            t = time.perf_counter()
            plans[name] = make_plan(job).as_dict(job)
            times[name] = round(time.perf_counter() - t, 2)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ranged = plans["range"]
    outcome = {n: {"items": p["items"], "rejects": p["rejects"]} for n, p in plans.items()}
    return {"plan_files": len(files),
            "plan_mb": round(ranged["bytes_of_files_read"] / 1e6, 1),
            "plan_read_mb": round(ranged["bytes_read"] / 1e6, 2),
            "plan_read_ratio": round(ranged["bytes_read"] / max(ranged["bytes_of_files_read"], 1),
                                     3),
            "plan_s_range": times["range"], "plan_s_local": times["local"],
            "plan_same_as_local": outcome["range"] == outcome["local"],
            "plan_by_range": outcome["range"], "plan_local": outcome["local"]}


def make_video(path: Path, mb: int) -> None:
    """An H.264 MP4 of about ``mb`` MiB: 720p noise (about 19 MB a second, a keyframe every half
    second), every frame its own (segments that repeated would be reused, not sent)."""
    import av
    import numpy as np

    rng = np.random.default_rng(1)
    with path.open("wb") as f, av.open(f, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"preset": "ultrafast", "qp": "26", "g": "15", "bf": "0"}
        while f.tell() < mb * 2**20:
            frame = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


# The run as before streaming: every object read whole into memory.
_HELD_WHOLE = ("import runpy, sys; import connectors.blob as b; b.SPOOL_BYTES = 1 << 62; "
               "sys.argv = ['embedpipe', *sys.argv[1:]]; "
               "runpy.run_module('pipeline.cli', run_name='__main__')")


def big_video_runs(server: S3Server, mb: int) -> dict[str, Any]:
    import obstore
    import yaml

    folder = Path(tempfile.mkdtemp(prefix="embedpipe-s3-video-"))
    try:
        video = folder / "big.mp4"
        make_video(video, mb)
        size = video.stat().st_size
        obstore.put(server.store("big"), "video/big.mp4", video)
        video.unlink()
        out: dict[str, Any] = {"video_mb": round(size / 2**20)}
        from pipeline.commands.planner import make_plan
        from pipeline.config import JobConfig

        planned = JobConfig.model_validate({
            "name": "video-plan", "source": server.source("big", "video"),
            "embed": {"provider": "gemini", "api_key": "bench", "model": "gemini-embedding-2",
                      "output_dimensionality": 128},
            "sink": {"kind": "lance", "uri": str(folder / "plan")}})
        t = time.perf_counter()
        plan = make_plan(planned).as_dict(planned)
        out |= {"video_plan_read_mb": round(plan["bytes_read"] / 2**20, 2),
                "video_plan_items": sum(plan["items"].values()),
                "video_plan_s": round(time.perf_counter() - t, 2)}
        with emulator_process() as base:
            for name, command in (("streamed", ["-m", "pipeline.cli"]),
                                  ("whole", ["-c", _HELD_WHOLE])):
                job = {"name": f"video-{name}", "source": server.source("big", "video"),
                       "embed": {"provider": "gemini", "api_key": "bench", "base_url": base,
                                 "model": "gemini-embedding-2", "mode": "interactive",
                                 "output_dimensionality": 128},
                       "sink": {"kind": "lance", "uri": str(folder / name / "lance")}}
                (folder / name).mkdir()
                path = folder / name / "job.yaml"
                path.write_text(yaml.safe_dump(job), encoding="utf-8")
                report = folder / name / "report.json"
                proc = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, *command,
                                       "run", "-q", "--report", str(report), str(path)],
                                      capture_output=True, text=True)
                ran = json.loads(proc.stdout.strip().splitlines()[-1])
                done = json.loads(report.read_text()) if report.exists() else {}
                out |= {f"video_rss_mb_{name}": round(ran["maxrss_kb"] / 1024),
                        f"video_exit_{name}": ran["code"], f"video_s_{name}": round(
                            ran["wall_s"], 1)}
                out["video_items"] = done.get("items_embedded")
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
