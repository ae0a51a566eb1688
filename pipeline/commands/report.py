"""``embedpipe report JOB``: the job's run history, as a table, JSON, or one self-contained
HTML page with charts (:mod:`pipeline.commands.report_page`)."""

from __future__ import annotations

import argparse
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.commands.common import JOB_HELP, answer, consoles, escape, load_job, positive
from pipeline.errors import ConfigError
from pipeline.terminal import plural

if TYPE_CHECKING:
    from rich.console import Console

    from pipeline.commands.history import History

NAME = "report"
HELP = ("the job's run history: figures per run as a table, JSON or one self-contained HTML "
        "page with charts")
EXAMPLE = "embedpipe report jobs/nightly.yaml --html history.html --last 60"


def arguments(report: argparse.ArgumentParser) -> None:
    report.add_argument("job", help=JOB_HELP)
    report.add_argument("--html", metavar="PATH", default=None,
                        help="write the page to PATH (opens offline: nothing is fetched)")
    report.add_argument("--last", type=positive, default=30, metavar="N",
                        help="how many of the latest runs (default 30)")
    report.add_argument("--json", action="store_true",
                        help="print the runs and latest rejects as one JSON object")
    report.add_argument("--wide", action="store_true",
                        help="every column of the runs table, however wide")


def main(args: argparse.Namespace) -> int:
    from pipeline.commands.history import run_history

    history = run_history(load_job(args.job), last=args.last)
    if args.html:
        from pipeline.atomic import write_text_atomic
        from pipeline.commands.report_page import render_html

        path = Path(args.html)
        try:
            write_text_atomic(path, render_html(history, datetime.now(UTC)))
        except OSError as exc:
            raise ConfigError(f"--html {path}: cannot write it: {exc.strerror or exc}") from exc
        consoles.err.print(f"wrote {escape(str(path))}: {plural(len(history.runs), 'run')}, "
                           f"{history.rejects_total:,} rejects", highlight=False, soft_wrap=True)
        return 0
    return answer(args, history.as_dict(),
                  lambda: show_history(consoles.out, history, wide=args.wide))


# The report's columns, most wanted first (the HTML page and --json have them all).
HISTORY_COLUMNS = [("run_id", "run"), ("status", "status"), ("started", "started (UTC)"),
                   ("items_embedded", "items"), ("files_done", "files"), ("cost_usd", "cost"),
                   ("rejects", "rejects"), ("wall_s", "wall"), ("latency_p50_s", "p50"),
                   ("latency_p95_s", "p95"), ("http_429", "429s"), ("retries", "retries")]


def show_history(out: Console, history: History, wide: bool = False) -> None:
    from pipeline.commands.report_page import dollars, seconds
    from pipeline.commands.tables import fitted, print_wide

    out.print(f"[bold]{escape(history.job)}[/]: the last {plural(len(history.runs), 'run')}",
              highlight=False)
    shown = {"cost_usd": dollars, "wall_s": seconds, "latency_p50_s": seconds,
             "latency_p95_s": seconds}
    rows = [{**run, **{c: None if run[c] is None else f(run[c]) for c, f in shown.items()}}
            for run in history.runs]
    table, dropped = fitted(out, HISTORY_COLUMNS, rows, wide)
    print_wide(out, table, wide)
    if dropped:
        out.print(f"({dropped} more columns: --wide, --json, or --html for charts)")
    reasons: Counter[str] = Counter()
    for run in history.runs:
        reasons.update(run["reject_reasons"] or {})
    if reasons:
        out.print("rejected in these runs: " + ", ".join(f"{r} {n:,}"
                                                         for r, n in reasons.most_common()))

