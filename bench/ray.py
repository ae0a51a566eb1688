"""The Ray engine against the local one on this machine, for a PDF-heavy corpus.

    python bench/ray.py [--copies 2] [--repeat 3] [--json]

The shared corpus's PDFs (``pdf/``), copied ``--copies`` times under distinct names (at least
3,000 pages), validated (split into 6-page parts) and embedded through the emulator (a process
of its own), ``--repeat`` times with ``engine: local``, then as many times with ``engine: ray``
(a Ray instance started on this machine before its runs, with this machine's CPUs, as a cluster
a nightly run joins is up before it; the start is timed apart, ``ray_start_s``). Prints every
run and the median pages per second of each engine (one run of the local engine varies by
+-10 % here: the median of three is the figure compared), the Ray nodes, the ceiling of the one
limiter actor (slots granted and given back per second by concurrent callers: the most calls
per second the cluster can make), and what the tables hold: ids written twice
(``duplicates``) and files without a manifest row (``lost``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# This file is bench/ray.py: its folder must not be on the path, or `import ray` finds it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

# imported after the path is fixed
import lancedb  # noqa: E402
import polars as pl  # noqa: E402
from pypdf import PdfReader  # noqa: E402

from bench.common import emulator_process, run, workdir, write_job  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def make_corpus(dest: Path, copies: int) -> tuple[int, int]:
    """The corpus's PDFs ``copies`` times, under distinct names; returns (files, pages)."""
    pdfs = sorted((CORPUS / "pdf").glob("*.pdf"))
    if not pdfs:
        raise SystemExit(f"no PDFs under {CORPUS / 'pdf'}: the shared corpus is needed")
    pages = {p: len(PdfReader(p).pages) for p in pdfs}
    for copy in range(copies):
        folder = dest / f"copy{copy:02d}"
        folder.mkdir(parents=True)
        for p in pdfs:
            shutil.copyfile(p, folder / p.name)
    return len(pdfs) * copies, sum(pages.values()) * copies


def accounted(job: Path, files: int) -> dict[str, int]:
    db = lancedb.connect(str(job.parent / "lance"))
    vectors = pl.DataFrame(pl.from_arrow(db.open_table("vectors").to_arrow().select(["id"])))
    manifest = pl.DataFrame(pl.from_arrow(db.open_table("files").to_arrow().select(["uri"])))
    return {"rows": vectors.height, "duplicates": vectors.height - vectors["id"].n_unique(),
            "lost": files - manifest["uri"].n_unique()}


def limiter_grants_per_s(callers: int = 64, seconds: float = 3.0) -> float:
    """Slots taken and given back per second through one limiter actor, by ``callers``
    concurrent callers (each a take and a give: two actor calls per grant)."""
    import ray

    from pipeline.engine.ray import Limiter

    limiter = ray.remote(num_cpus=0)(Limiter).options(max_concurrency=1000).remote(
        None, None, None, callers)

    async def caller(until: float) -> int:
        done = 0
        while time.monotonic() < until:
            await limiter.take_slot.remote(0)
            await limiter.give_slot.remote(0)
            done += 1
        return done

    async def main() -> int:
        until = time.monotonic() + seconds
        return sum(await asyncio.gather(*(caller(until) for _ in range(callers))))

    ray.get(limiter.granted.remote())  # started
    started = time.monotonic()
    grants = asyncio.run(main())
    return grants / (time.monotonic() - started)


def start_ray() -> float:
    """A Ray instance on this machine (all its CPUs) that the run joins; seconds to start."""
    import warnings

    import ray

    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="lancedb fork support")
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return time.monotonic() - started


def measure(folder: Path, src: Path, files: int, pages: int, base: str,
            engine: str, attempt: int) -> dict[str, Any]:
    embed = {"provider": "gemini", "api_key": "bench", "base_url": base,
             "model": "gemini-embedding-2", "output_dimensionality": 768,
             "mode": "interactive", "concurrency": 8}
    work = folder / f"{engine}-{attempt}"
    work.mkdir()
    job = write_job(work, src, embed, run={"engine": engine},
                    validate={"file_timeout_s": 600})
    before = resource.getrusage(resource.RUSAGE_SELF)
    timed = run(job)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if timed.result.exit_code != 0:
        raise SystemExit(f"{engine} run failed ({timed.result.exit_code}): "
                         f"{timed.result.problems[:3]}")
    return {"wall_s": round(timed.wall_s, 2), "pages_per_s": round(pages / timed.wall_s, 1),
            "driver_cpu_s": round(cpu_s, 1),
            "items": timed.result.stats.items_embedded, **accounted(job, files)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=2,
                        help="copies of the corpus's PDFs (default 2: about 6,100 pages)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each engine; their median is compared (default 3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = workdir()
    try:
        src = folder / "src"
        files, pages = make_corpus(src, args.copies)
        with emulator_process("--latency-ms", "50") as base:
            locals_ = [measure(folder, src, files, pages, base, "local", k)
                       for k in range(args.repeat)]
            ray_start_s = start_ray()
            try:
                rays = [measure(folder, src, files, pages, base, "ray", k)
                        for k in range(args.repeat)]
                grants = limiter_grants_per_s()
            finally:
                import ray

                ray.shutdown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    local_rate = statistics.median(r["pages_per_s"] for r in locals_)
    ray_rate = statistics.median(r["pages_per_s"] for r in rays)
    runs = [*locals_, *rays]
    figures = {
        "files": files, "pages": pages, "cpus": os.cpu_count(), "repeat": args.repeat,
        "local_pages_per_s": local_rate, "ray_pages_per_s": ray_rate,
        "speedup": round(ray_rate / local_rate, 2),
        "ray_nodes": 1, "ray_start_s": round(ray_start_s, 1),
        "limiter_grants_per_s": round(grants),
        "duplicates": sum(r["duplicates"] for r in runs), "lost": sum(r["lost"] for r in runs),
        "local": locals_, "ray": rays,
    }
    print(f"{files} PDFs, {pages:,} pages, {figures['cpus']} CPUs")
    print(f"{'engine':>8}{'wall s':>9}{'pages/s':>10}{'driver CPU s':>14}{'rows':>8}"
          f"{'duplicates':>12}{'lost':>6}")
    for name, r in [*(("local", r) for r in locals_), *(("ray", r) for r in rays)]:
        print(f"{name:>8}{r['wall_s']:>9}{r['pages_per_s']:>10}{r['driver_cpu_s']:>14}"
              f"{r['rows']:>8}{r['duplicates']:>12}{r['lost']:>6}")
    print(f"median pages/s: local {local_rate}, ray {ray_rate}: ray / local = "
          f"{figures['speedup']}x (target >= 1.6; Ray's start, {ray_start_s:.1f} s, before its "
          f"runs); one limiter actor grants {figures['limiter_grants_per_s']:,} call slots/s")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
