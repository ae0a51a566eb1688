"""Object-store speed: list-and-diff of 10,000 objects and read throughput, beside boto3.

    python bench/s3.py [--objects 10000] [--read-mb 64] [--json]

Starts SeaweedFS (the dev dependency) on loopback, fills a bucket, then in one run:
- embedpipe: S3Connector listing + the manifest diff of a no-change night (listing only, the
  manifest says every object is unchanged), and reading objects through S3Connector;
- boto3: a paginated list_objects_v2 of the same prefix, and get_object reads of the same keys;
- obstore alone: a bare listing of the same prefix as Arrow (the floor of a listing), and the
  list + diff time per 100,000 objects beside it (the target: within 1.5x).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3

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
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
