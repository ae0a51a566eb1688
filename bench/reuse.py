"""Content reuse: what a reorganised corpus costs with reuse on and off, and what a look-up
costs against a large table.

    python bench/reuse.py [--files 10000] [--cached-rows 1000000] [--json]

(The first run, a backlog of 10,000 items, goes through the Batch API in the default
``mode: auto``: its figures count Batch jobs, not interactive calls.)

A corpus of ``files`` files (generated texts, plus the PDFs and images of ../shared/corpus
where it is present, else generated ones) is embedded against the in-process emulator. Then
30 % of the files move to other folders, 10 % are renamed and 1,000 copies of existing files
are added, and the same second run is made three ways, from copies of the first run's table:
reuse on (``title_from: content``: a rename changes nothing that is sent), reuse on with the
default ``title_from: name`` (a renamed text file sends its new name: paid again), and reuse
off. Each prints api_calls, items_reused, items_embedded, cost_saved_usd, wall_s and exit code.

Last, a table of ``cached-rows`` rows with a BTREE index on content_key is looked up 256 keys
at a time (half of them present), as the reuse stage does: ms per look-up and µs per item,
beside the same look-ups without the index.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import run, workdir, write_job
from pipeline.commands.sample_files import make_quickstart_media, make_text_corpus

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpus"
EMBED = {"provider": "emulator", "model": "gemini-embedding-2", "output_dimensionality": 768}


def _media(dest: Path) -> int:
    """The shared corpus's good PDFs and images (by its MANIFEST), else generated ones."""
    dest.mkdir(parents=True)
    manifest = SHARED / "MANIFEST.tsv"
    if not manifest.exists():
        return len(make_quickstart_media(dest))
    count = 0
    for line in manifest.read_text(encoding="utf-8").splitlines()[1:]:
        path, _, _, mime, *_rest = line.split("\t")
        expected = _rest[2] if len(_rest) > 2 else ""
        if expected == "ok" and (mime.startswith("image/") or mime == "application/pdf"):
            source = SHARED / path
            if source.is_file():
                shutil.copy(source, dest / source.name)
                count += 1
    return count


def _reorganise(src: Path, seed: int = 3) -> dict[str, int]:
    rng = random.Random(seed)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    rng.shuffle(files)
    n = len(files)
    moves, renames = files[: n * 3 // 10], files[n * 3 // 10 : n * 4 // 10]
    for i, path in enumerate(moves):
        target = src / "reorganised" / f"box-{i % 20:02d}"
        target.mkdir(parents=True, exist_ok=True)
        path.rename(target / path.name)
    for path in renames:
        path.rename(path.with_name("renamed-" + path.name))
    copies = src / "copies"
    copies.mkdir()
    rest = files[n * 4 // 10 :]
    for i in range(1000):
        original = rest[i % len(rest)]
        shutil.copy(original, copies / f"copy-{i:04d}-{original.name}")
    return {"moved": len(moves), "renamed": len(renames), "duplicates": 1000}


def _job(folder: Path, src: Path, **embed: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_job(folder, src, {**EMBED, **embed})


def _second(root: Path, base: Path, src: Path, **embed: Any) -> dict[str, Any]:
    shutil.copytree(base / "lance", root / "lance")
    timed = run(_job(root, src, **embed))
    r = timed.result
    return {"exit_code": r.exit_code, "api_calls": r.stats.api_calls,
            "batch_jobs": r.stats.batch_jobs,
            "items_reused": r.stats.items_reused, "items_embedded": r.stats.items_embedded,
            "files_moved": r.stats.files_moved, "files_deleted": r.stats.files_deleted,
            "cost_saved_usd": r.report.get("cost_saved_usd"), "cost_usd": r.report.get("cost_usd"),
            "wall_s": round(timed.wall_s, 2)}


def _lookups(rows: int, folder: Path) -> dict[str, Any]:
    import lancedb

    from pipeline.sinks.lance import find_keys, keep_btree, vectors_schema

    dims = 128
    schema = vectors_schema(dims)
    db = lancedb.connect(str(folder))
    table = db.create_table("cache", schema=schema)
    rng = np.random.default_rng(5)
    keys = [f"{i:032x}" for i in rng.choice(2**62, rows, replace=False)]
    chunk = 200_000
    for start in range(0, rows, chunk):
        part = keys[start : start + chunk]
        n = len(part)
        columns: dict[str, Any] = {f.name: pa.nulls(n, f.type) for f in schema}
        columns.update({
            "id": pa.array([f"id{start + i}" for i in range(n)]),
            "uri": pa.array([f"file:///c/{start + i}" for i in range(n)]),
            "version": pa.array(["v"] * n), "model": pa.array(["gemini-embedding-2"] * n),
            "content_key": pa.array(part), "tokens": pa.array([10] * n, pa.int32()),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.random(n * dims, dtype=np.float32)), dims)})
        table.add(pa.table(columns, schema=schema))
    probes = []
    for _ in range(20):
        present = [keys[int(i)] for i in rng.choice(rows, 128, replace=False)]
        absent = [f"{int(i):032x}" for i in rng.integers(0, 2**62, 128)]
        probes.append(present + absent)

    def timed() -> float:
        find_keys(table, probes[0], "gemini-embedding-2", dims)  # warm
        started = time.perf_counter()
        for probe in probes:
            found = find_keys(table, probe, "gemini-embedding-2", dims)
            assert len(found) == 128, len(found)
        return (time.perf_counter() - started) / len(probes)

    scan = timed()
    keep_btree(table, "content_key", 0)
    indexed = timed()
    return {"cached_rows": rows, "keys_per_lookup": 256, "hits_per_lookup": 128,
            "indexed_ms_per_lookup": round(indexed * 1000, 2),
            "indexed_us_per_item": round(indexed * 1e6 / 256, 1),
            "scan_ms_per_lookup": round(scan * 1000, 2),
            "scan_us_per_item": round(scan * 1e6 / 256, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--cached-rows", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = workdir()
    try:
        src = root / "src"
        media = _media(src / "media")
        make_text_corpus(src / "texts", args.files - media, per_folder=500)
        first = run(_job(root / "first", src, title_from="content"))
        # the default title_from: name makes its own first table (its requests differ)
        run(_job(root / "first-named", src))
        changes = _reorganise(src)
        out: dict[str, Any] = {
            "measured": time.strftime("%Y-%m-%d", time.gmtime()),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, cwd=Path(__file__).parent).stdout.strip(),
            "files": args.files, "media_files": media, **changes,
            "first_run": {"items_embedded": first.result.stats.items_embedded,
                          "api_calls": first.result.stats.api_calls,
                          "batch_jobs": first.result.stats.batch_jobs,
                          "items_batch_submitted": first.result.stats.items_batch_submitted,
                          "wall_s": round(first.wall_s, 2)},
            "reuse_on": _second(root / "on", root / "first", src, title_from="content"),
            "reuse_on_title_from_name": _second(root / "named", root / "first-named", src),
            "reuse_off": _second(root / "off", root / "first", src, title_from="content",
                                 reuse=False),
            "lookup": _lookups(args.cached_rows, root / "cache"),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{out['files']:,} files ({out['media_files']} PDFs and images); moved "
          f"{out['moved']:,}, renamed {out['renamed']:,}, {out['duplicates']:,} duplicates added"
          f" — measured {out['measured']} on {out['commit']}")
    print(f"{'second run':28} {'calls':>7} {'reused':>8} {'embedded':>9} {'saved $':>9} "
          f"{'wall s':>7} {'exit':>5}")
    for name in ("reuse_on", "reuse_on_title_from_name", "reuse_off"):
        r = out[name]
        print(f"{name:28} {r['api_calls']:>7,} {r['items_reused']:>8,} {r['items_embedded']:>9,}"
              f" {r['cost_saved_usd']:>9.4f} {r['wall_s']:>7} {r['exit_code']:>5}")
    lk = out["lookup"]
    print(f"look-up of 256 keys in {lk['cached_rows']:,} rows: {lk['indexed_ms_per_lookup']} ms "
          f"({lk['indexed_us_per_item']} µs/item) with the index, {lk['scan_ms_per_lookup']} ms "
          f"({lk['scan_us_per_item']} µs/item) scanning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
