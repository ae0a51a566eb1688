"""``embedpipe rejects JOB``: the job's rejected files and parts, why, and what to do
(:mod:`pipeline.commands.reject_list`)."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import TYPE_CHECKING, Any

from pipeline.commands.common import JOB_HELP, answer, consoles, load_job
from pipeline.terminal import printable

if TYPE_CHECKING:
    from rich.console import Console

NAME = "rejects"
HELP = "the job's rejected files and parts, why, and what to do"
EXAMPLE = "embedpipe rejects jobs/nightly.yaml --reason encrypted"


def arguments(rejects: argparse.ArgumentParser) -> None:
    rejects.add_argument("job", help=JOB_HELP)
    rejects.add_argument("--reason", default=None,
                         help="only this reason (corrupt, encrypted, unsupported, too_long, "
                              "too_large, unreadable, empty, timeout, api_rejected)")
    rejects.add_argument("--json", action="store_true",
                         help="print them as a JSON array, each with its fix")
    rejects.add_argument("--wide", action="store_true",
                         help="wrap long names and messages instead of cutting them")


def main(args: argparse.Namespace) -> int:
    from pipeline.commands.reject_list import list_rejects

    rows = list_rejects(load_job(args.job), args.reason)
    return answer(args, rows, lambda: show_rejects(consoles.out, rows, wide=args.wide))


def show_rejects(out: Console, rows: list[dict[str, Any]], wide: bool = False) -> None:
    """The rejects, one line each at the console's width, then what to do per reason."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from pipeline.commands.tables import cut, print_wide

    if not rows:
        out.print("no rejects")
        return
    key_w = 32
    message_w = max(20, out.width - (1 + (key_w + 3) + (12 + 3) + 3))
    table = Table(show_lines=wide)
    for col in ("file", "reason", "message"):
        table.add_column(col, no_wrap=not wide, overflow="fold")
    for row in rows:
        name = printable(row["key"] or row["uri"])
        if row["part"] is not None:
            name = f"{name} #{row['part'] + 1}"
        message = printable((row["message"] or "").replace("\n", " "))
        if not wide:
            name, message = cut(name, key_w), cut(message, message_w)
        table.add_row(Text(name), row["reason"], Text(message))
    print_wide(out, table, wide)
    for reason, n in Counter(row["reason"] for row in rows).most_common():
        fix = next(r["fix"] for r in rows if r["reason"] == reason)
        out.print(f"[bold]{reason}[/] ({n}): {escape(fix)}", highlight=False)

