"""``embedpipe run JOB``: embed what is new or changed, delete what is gone; the summary, the
JSON report, and the exit code that says how the run ended."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.commands.common import (
    CONTEXT,
    JOB_HELP,
    JSON_LOGS,
    consoles,
    job_settings,
    json_line,
    load_job,
    notice,
    overrides,
)
from pipeline.outcome import EXIT_INTERRUPTED, EXIT_PENDING
from pipeline.terminal import plural, printable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from pipeline.config import JobConfig
    from pipeline.run import Run, RunResult
    from pipeline.stats import RunStats

NAME = "run"
HELP = "run a job: embed what is new or changed"
EXAMPLE = "embedpipe run jobs/nightly.yaml --report run.json"


def arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("job", help=JOB_HELP)
    run.add_argument("--retry-rejects", action="store_true",
                     help="try files rejected by earlier runs again even if unchanged")
    run.add_argument("--allow-mass-delete", action="store_true",
                     help="delete the rows of removed files even when they are more than "
                          "run.max_delete_fraction of the job's files (or all of them)")
    run.add_argument("--detach", action="store_true",
                     help="submit Batch API jobs and exit (code 6) without waiting for them; "
                          "the next run collects them")
    run.add_argument("--engine", choices=("local", "ray", "auto"), default=None,
                     help="where validation and the calls run (default: the job's run.engine): "
                          "ray sends them to a Ray cluster, auto uses Ray when RAY_ADDRESS is set")
    run.add_argument("--address", default=None, metavar="ADDR",
                     help="the Ray cluster to join (default: run.ray_address, RAY_ADDRESS, "
                          "else one started on this machine for the run)")
    job_settings(run, "override a job key for this run, checked like the file's own "
                      "(repeatable): --set embed.concurrency=8 --set run.flush_rows=500")
    run.add_argument("--report", metavar="PATH", default=None,
                     help="write the run's figures as JSON to PATH ('-' for stdout)")


def main(args: argparse.Namespace) -> int:
    settings = overrides(args)
    if args.engine or args.address:  # shorthands for --set run.engine=... run.ray_address=...
        settings[("run", "engine")] = args.engine or "ray"
    if args.address:
        settings[("run", "ray_address")] = args.address
    import anyio

    from pipeline.memory import freeze_startup_objects, tune_for_long_run
    from pipeline.run import Run

    # SIGTERM before the engine takes over its signals (joining a cluster, opening the sink)
    # ends the run as Ctrl-C does: exit 130, the runs row says so.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    job = load_job(args.job, overrides=settings)
    CONTEXT["job"] = job.name
    tune_for_long_run()  # this process is the run's: before any worker thread starts
    show = not args.quiet and consoles.err.is_terminal and not JSON_LOGS["on"]
    progress, update = progress_display(consoles.err, show)
    run = Run(job, retry_rejects=args.retry_rejects, allow_mass_delete=args.allow_mass_delete,
              detach=args.detach, on_progress=update)
    CONTEXT["run_id"] = run.stats.run_id
    freeze_startup_objects()  # what exists now lives as long as the run
    if progress is not None:
        with progress:
            result = anyio.run(run.execute)
    else:
        result = anyio.run(run.execute)
    if args.report:
        text = json.dumps(result.report, default=str)
        if args.report == "-":
            print(text)
        else:
            Path(args.report).write_text(text + "\n", encoding="utf-8")
    if JSON_LOGS["on"]:  # the summary as one line a log pipeline can read
        level = "info" if result.exit_code in (0, EXIT_PENDING) else "error"
        print(json_line(level, "run ended", **result.report), file=sys.stderr, flush=True)
    elif not args.quiet:
        show_summary(consoles.err, job, result, run)
    _advice(run, result)
    return result.exit_code


def _advice(run: Run, result: RunResult) -> None:
    """What the operator should know on the way out: why it failed, what is left to do."""
    if run.failure is not None:
        notice("run failed", run.failure)
    if result.exit_code == EXIT_INTERRUPTED:
        s = result.stats
        left = s.files_new + s.files_changed - s.files_done
        more = "" if s.listing_done else " (and the rest of the listing, which was not finished)"
        notice("interrupted", f"{left:,} files still to do{more}; what was done is committed "
                              "and the next run continues from there")
    if result.exit_code == EXIT_PENDING:
        notice("pending", f"{plural(result.stats.batch_jobs_pending, 'Batch API job')} running "
                          "server-side; run the job again (cron's next run does) to collect "
                          "them: nothing is submitted twice")
    elif result.stats.batch_jobs and result.exit_code == EXIT_INTERRUPTED:
        notice("note", "Batch API jobs keep running server-side; the next run collects them "
                       "(`embedpipe batches JOB --cancel` cancels them)")
    if result.exit_code == 4 and run.quota_error is not None:
        delay = run.quota_error.retry_after_s
        when = (f"at {datetime.now(UTC) + timedelta(seconds=delay):%Y-%m-%d %H:%M:%S} UTC"
                if delay else "at midnight Pacific time (Google's daily reset)")
        notice("stopped", run.quota_error.advice(when))


def progress_display(console: Console, enabled: bool,
                     ) -> tuple[Progress | None, Callable[[RunStats], None] | None]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled:
        return None, None
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.fields[files]}"),
                        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                        console=console, transient=True)
    task = progress.add_task("listing", total=None, files="", detail="")

    def update(stats: RunStats) -> None:
        todo = stats.files_new + stats.files_changed
        # Until the listing is done the total is not known: say what is, not "4/None".
        files = (f"{stats.files_done:,}/{todo:,} files" if stats.listing_done else
                 f"{stats.files_done:,} done of {todo:,} found so far "
                 f"({stats.files_seen:,} listed)")
        progress.update(task, completed=stats.files_done, total=todo if stats.listing_done else None,
                        description="embedding" if stats.listing_done else "listing",
                        files=files, detail=f"{stats.items_embedded:,} items, "
                                            f"{stats.rejects:,} rejects, {stats.tokens:,} tokens")

    return progress, update


def show_summary(console: Console, job: JobConfig, result: RunResult, run: Run) -> None:
    from rich.markup import escape
    from rich.table import Table

    s = result.stats
    console.print(f"[bold]run {s.run_id}[/] of job [bold]{job.name}[/]", highlight=False)
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("files seen", s.files_seen), ("  new", s.files_new), ("  changed", s.files_changed),
        ("  unchanged", s.files_unchanged),
        ("  rejected at listing", s.files_rejected_at_listing),
        *((("  links to folders skipped", s.links_skipped),) if s.links_skipped else ()),
        *((("  sidecars", s.files_sidecars),) if s.files_sidecars else ()),
        ("files deleted", s.files_deleted),
        *((("  moved (content found under another path)", s.files_moved),)
          if s.files_moved else ()),
        ("items embedded", s.items_embedded),
        *((("items reused (not paid again)", s.items_reused),) if s.items_reused else ()),
        ("rejected", s.rejects),
        ("tokens", f"{s.tokens:,}"), ("API calls", s.api_calls), ("retries", s.retries),
        ("HTTP 429", s.http_429), ("wall time", f"{s.wall_s:.1f} s"),
    ]
    if s.batch_jobs or s.items_batch or s.items_batch_awaited:
        rows += [("Batch API jobs", s.batch_jobs), ("  items (half price)", s.items_batch),
                 ("  collected from earlier jobs", s.items_batch_awaited),
                 ("  sent interactively", s.items_fallback)]
    for name, value in rows:
        table.add_row(name, str(value))
    for reason, n in sorted(s.reject_reasons.items()):
        table.add_row(f"  rejected {reason}", str(n))
    console.print(table)
    if s.upgrade:
        console.print(f"upgrade: {escape(s.upgrade)}", highlight=False, soft_wrap=True)
    if s.mode_used == "batch" or "does not serve" in s.mode_why:
        console.print(f"API used: {s.mode_used} ({escape(s.mode_why)})", highlight=False,
                      soft_wrap=True)
    for problem in result.problems[:10]:
        if problem != run.failure:
            console.print(f"[yellow]problem:[/] {escape(printable(problem))}", highlight=False,
                          soft_wrap=True)
    console.print(f"table: {job.sink.uri} ({job.sink.table}); rejects in {job.sink.rejects_table}")
    if getattr(run, "report_path", None):
        console.print(f"report: {run.report_path}")

