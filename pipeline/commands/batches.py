"""``embedpipe batches JOB``: the job's Batch API jobs, and cancelling them
(:mod:`pipeline.commands.batch_jobs`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pipeline.commands.common import JOB_HELP, answer, consoles, load_job

if TYPE_CHECKING:
    from rich.console import Console

    from pipeline.config import JobConfig

NAME = "batches"
HELP = "the job's Batch API jobs (and cancelling them)"
EXAMPLE = "embedpipe batches jobs/backfill.yaml --json"


def arguments(batches: argparse.ArgumentParser) -> None:
    batches.add_argument("job", help=JOB_HELP)
    batches.add_argument("--cancel", action="store_true",
                         help="cancel the open jobs; their items are submitted again next run")
    batches.add_argument("--json", action="store_true", help="print them as a JSON array")
    batches.add_argument("--wide", action="store_true",
                         help="every column at its natural width, however wide")


def main(args: argparse.Namespace) -> int:
    import anyio

    from pipeline.commands.batch_jobs import batch_jobs

    job = load_job(args.job)
    rows = anyio.run(lambda: batch_jobs(job, cancel=args.cancel))
    return answer(args, rows, lambda: show_batches(consoles.out, job, rows, wide=args.wide))


def show_batches(out: Console, job: JobConfig, rows: list[dict[str, Any]],
                 wide: bool = False) -> None:
    from rich.table import Table

    from pipeline.commands.tables import print_wide

    table = Table(title=f"Batch API jobs of {job.name}")
    for col in ("display name", "job", "status", "service", "items", "created"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["display_name"], row["name"] or "-", row["status"],
                      row.get("service_state", "-"), str(row["items"]),
                      f"{row['created']:%Y-%m-%d %H:%M}")
    print_wide(out, table, wide)

