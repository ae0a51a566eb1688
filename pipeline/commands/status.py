"""``embedpipe status JOB``: the last runs and what the job's tables hold."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pipeline.commands.common import JOB_HELP, answer, consoles, load_job
from pipeline.terminal import plural

if TYPE_CHECKING:
    from rich.console import Console

    from pipeline.config import JobConfig

NAME = "status"
HELP = "the last runs and what the job's tables hold"
EXAMPLE = "embedpipe status jobs/nightly.yaml --json"


def arguments(status: argparse.ArgumentParser) -> None:
    status.add_argument("job", help=JOB_HELP)
    status.add_argument("--json", action="store_true", help="print it as one JSON object")
    status.add_argument("--wide", action="store_true",
                        help="every column of the runs table, however wide")


def main(args: argparse.Namespace) -> int:
    from pipeline.commands.lookup import table_status

    job = load_job(args.job)
    status = table_status(job)
    return answer(args, status, lambda: show_status(consoles.out, job, status, wide=args.wide))


def show_status(out: Console, job: JobConfig, status: dict[str, Any], wide: bool = False) -> None:
    from pipeline.commands.tables import RUN_COLUMNS, fitted, print_wide

    out.print(f"[bold]{job.name}[/]: {status['uri']}", highlight=False, soft_wrap=True)
    out.print("rows: " + ", ".join(f"{k} {v if v is not None else '-'}"
                                   for k, v in status["rows"].items()), highlight=False)
    out.print("files: " + (", ".join(f"{k} {v}" for k, v in status["files"].items()) or "none"))
    if (t := status.get("table")) is not None:
        disk = "" if t["disk_bytes"] is None else f", {t['disk_bytes'] / 1e6:,.1f} MB on disk"
        out.print(f"table: {t['model'] or '-'}, {t['dims']} dimensions", highlight=False)
        out.print(f"versions: {t['version']} ({t['versions']:,} kept, "
                  f"{plural(t['tags'], 'tag')}), {plural(t['fragments'], 'fragment')}, "
                  f"{t['live_bytes'] / 1e6:,.1f} MB of data{disk}", highlight=False)
    table, dropped = fitted(out, RUN_COLUMNS, status["runs"], wide, title="last runs")
    print_wide(out, table, wide)
    if dropped:
        out.print(f"({dropped} more columns: --wide, or --json for everything)")
    pending = status["pending"]
    if pending is not None:
        left = ("an unknown number of files (it was killed before its listing finished)"
                if pending["files"] is None else f"{pending['files']:,} files")
        out.print(f"[yellow]last run {pending['run_id']} is {pending['status']}:[/] {left} "
                  "still to do; run the job again to continue", highlight=False, soft_wrap=True)

