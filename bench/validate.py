"""Benchmark the validator: the whole corpus, and PDF splitting against plain pypdf.

Each measurement runs in its own child process so its peak RSS is its own.

    python bench/validate.py [--corpus ../shared/corpus] [--json]

Prints wall time and peak RSS to validate and split every corpus file (default policies), and
pages per second splitting the largest PDF beside plain pypdf reading every page of it (open,
then each page's content stream), each timed from after its imports (PyAV, pydantic and the
rest of the validator's are start-up, not splitting). With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE.parent.parent / "shared" / "corpus"

CHILD = r"""
import json, resource, sys, time
from datetime import UTC, datetime
from pathlib import Path
mode, target = sys.argv[1], Path(sys.argv[2])
out = {}
if mode == "pypdf":
    from pypdf import PdfReader
    t0 = time.perf_counter()  # from here: the work, not the imports (on both sides)
    reader = PdfReader(target)
    n = 0
    for page in reader.pages:
        contents = page.get_contents()
        n += len(contents.get_data()) if contents is not None else 0
    out["pages"] = len(reader.pages)
else:
    from pipeline.config import JobConfig
    from pipeline.records import Item, SourceObject
    from pipeline.validate import Validator
    t0 = time.perf_counter()
    job = JobConfig.model_validate({"name": "bench", "source": {"kind": "local", "root": "/"},
        "embed": {"provider": "emulator"}, "sink": {"kind": "lance", "uri": "/tmp/unused"}})
    validator = Validator(job)
    files = [target] if target.is_file() else sorted(
        p for p in target.rglob("*") if p.is_file() and p.suffix not in (".md", ".tsv"))
    items = rejects = pages = 0
    for path in files:
        obj = SourceObject(path.as_uri(), path.name, path.stat().st_size, datetime.now(UTC), "v")
        for entry in validator.fit(obj, path.read_bytes()):
            if isinstance(entry, Item):
                items += 1
                if entry.span.page_end:
                    pages += entry.span.page_end - entry.span.page_start + 1
            else:
                rejects += 1
    out.update(files=len(files), items=items, rejects=rejects, pages=pages)
out["wall_s"] = time.perf_counter() - t0
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def child(mode: str, target: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(target)], capture_output=True,
                          text=True, check=True, cwd=HERE.parent)
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.corpus.is_dir():
        print(f"corpus not found at {args.corpus}", file=sys.stderr)
        return 2
    biggest = max((p for p in args.corpus.rglob("*.pdf") if "bad" not in p.parts),
                  key=lambda p: p.stat().st_size)
    corpus = child("validate", args.corpus)
    split = child("validate", biggest)
    baseline = child("pypdf", biggest)
    figures = {
        "corpus_files": corpus["files"], "corpus_items": corpus["items"],
        "corpus_rejects": corpus["rejects"], "corpus_wall_s": round(corpus["wall_s"], 2),
        "peak_rss_mb": round(corpus["peak_rss_mb"], 1),
        "pdf": biggest.name, "pdf_pages": split["pages"],
        "pdf_split_wall_s": round(split["wall_s"], 2),
        "pdf_split_peak_rss_mb": round(split["peak_rss_mb"], 1),
        "pdf_pages_per_s": round(split["pages"] / split["wall_s"], 1),
        "pypdf_pages_per_s": round(baseline["pages"] / baseline["wall_s"], 1),
        "pypdf_peak_rss_mb": round(baseline["peak_rss_mb"], 1),
    }
    print(f"corpus: {corpus['files']:.0f} files -> {corpus['items']:.0f} items, "
          f"{corpus['rejects']:.0f} rejects in {corpus['wall_s']:.1f} s, "
          f"peak RSS {corpus['peak_rss_mb']:.0f} MB")
    print(f"{'':28}{'embedpipe split':>18}{'plain pypdf read':>18}")
    print(f"{biggest.name + ' pages/s':28}{figures['pdf_pages_per_s']:>18}"
          f"{figures['pypdf_pages_per_s']:>18}")
    print(f"{'peak RSS MB':28}{figures['pdf_split_peak_rss_mb']:>18}"
          f"{figures['pypdf_peak_rss_mb']:>18}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
