"""``embedpipe search JOB QUERY``: the rows nearest to a text query, or to a query file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.commands.common import (
    JOB_HELP,
    answer,
    consoles,
    job_settings,
    load_job,
    overrides,
    positive,
)
from pipeline.terminal import printable

if TYPE_CHECKING:
    from rich.console import Console

NAME = "search"
HELP = "the rows nearest to a text query (or a query file)"
EXAMPLE = "embedpipe search jobs/nightly.yaml \"harbour at night\" -k 3 --where \"modality = 'image'\""


def arguments(search: argparse.ArgumentParser) -> None:
    search.add_argument("job", help=JOB_HELP)
    search.add_argument("query", nargs="?", default=None, help="the query text")
    search.add_argument("--file", default=None,
                        help="a query file (image, audio, video, PDF), alone or with the text")
    search.add_argument("-k", type=positive, default=5, help="how many rows (default 5)")
    search.add_argument("--json", action="store_true",
                        help="print the rows as a JSON array (every column, full text)")
    search.add_argument("--wide", action="store_true",
                        help="wrap long sources and texts instead of cutting them")
    search.add_argument("--where", default=None, help="a Lance filter, e.g. \"modality = 'text'\"")
    job_settings(search, "search with a job key overridden, as `run --set` (repeatable)")


def main(args: argparse.Namespace) -> int:
    import anyio

    from pipeline.commands.lookup import search

    job = load_job(args.job, overrides=overrides(args))
    file = Path(args.file) if args.file else None
    hits = anyio.run(lambda: search(job, args.query, k=args.k, where=args.where, file=file))
    return answer(args, hits, lambda: show_hits(consoles.out, hits, wide=args.wide))


def show_hits(out: Console, hits: list[dict[str, Any]], wide: bool = False) -> None:
    """One line per hit that fits the console: source and text cut with an ellipsis, the
    where and modality columns only where there is room (``--wide``: everything, wrapped;
    ``--json``: every column in full)."""
    from rich.table import Table
    from rich.text import Text

    from pipeline.commands.tables import cut, print_wide

    source_w, where_w, modality_w = 28, 18, 8
    width = out.width
    columns = ["#", "score", "source"]
    used = 1 + (2 + 3) + (5 + 3) + (source_w + 3)
    for name, w in (("where", where_w), ("modality", modality_w)):
        if wide or width - used - (w + 3) >= 30 + 3:  # the text keeps 30 columns at least
            columns.append(name)
            used += w + 3
    columns.append("text")
    text_w = max(10, width - used - 3)
    table = Table(show_lines=wide)
    for col in columns:
        table.add_column(col, no_wrap=not wide, overflow="fold")
    for rank, hit in enumerate(hits, 1):
        cells = {"#": str(rank), "score": f"{hit['score']:.3f}",
                 "source": printable(hit["key"] or hit["uri"]), "where": hit["where"],
                 "modality": hit["modality"],
                 "text": printable((hit["text"] or "").replace("\n", " "))}
        if not wide:
            cells.update(source=cut(cells["source"], source_w),
                         where=cut(cells["where"], where_w), text=cut(cells["text"], text_w))
        else:
            cells["text"] = cells["text"][:400]
        table.add_row(*(Text(cells[c]) for c in columns))
    print_wide(out, table, wide)

