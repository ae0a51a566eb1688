"""The ``embedpipe`` command.

    embedpipe run JOB.yaml            embed what is new or changed; exit codes below
    embedpipe search JOB.yaml QUERY   nearest rows to a text query
    embedpipe status JOB.yaml         what the job's tables hold
    embedpipe emulator                serve the Gemini-compatible emulator in the foreground

Exit codes: 0 all embedded; 1 finished, with rejects; 2 bad job file or usage; 3 the run failed
(some items could not be embedded; run again to retry them); 4 a per-day quota is exhausted
(run again after it resets); 5 another run of the job (or into the same table) is under way;
130 interrupted.

This is the only module that prints or imports rich; the pipeline reports through RunStats.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.config import JobConfig, load_job
from pipeline.engine.threads import threads_left
from pipeline.errors import ConfigError, PipelineError
from pipeline.outcome import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_USAGE, run_status
from pipeline.run import Run, RunResult
from pipeline.state.lock import JobLocked
from pipeline.stats import RunStats

console = Console(stderr=True)
out = Console()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": record.created, "level": record.levelname.lower(),
                           "logger": record.name, "msg": record.getMessage()})


def _setup_logging(fmt: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler],
                        force=True)
    for noisy in ("httpx", "httpcore", "uvicorn", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _progress_display(enabled: bool) -> tuple[Progress | None, Callable[[RunStats], None] | None]:
    if not enabled:
        return None, None
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} files"),
                        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                        console=console, transient=True)
    task = progress.add_task("embedding", total=None, detail="")

    def update(stats: RunStats) -> None:
        todo = stats.files_new + stats.files_changed
        progress.update(task, completed=stats.files_done, total=todo if stats.listing_done else None,
                        detail=f"{stats.items_embedded} items, {stats.rejects} rejects, "
                               f"{stats.tokens:,} tokens")

    return progress, update


def _summary(job: JobConfig, result: RunResult, run: Run) -> None:
    s = result.stats
    console.print(f"[bold]run {s.run_id}[/] of job [bold]{job.name}[/]", highlight=False)
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("files seen", s.files_seen), ("  new", s.files_new), ("  changed", s.files_changed),
        ("  unchanged", s.files_unchanged),
        ("  rejected at listing", s.files_rejected_at_listing),
        *((("  sidecars", s.files_sidecars),) if s.files_sidecars else ()),
        ("files deleted", s.files_deleted),
        ("items embedded", s.items_embedded), ("rejected", s.rejects),
        ("tokens", f"{s.tokens:,}"), ("API calls", s.api_calls), ("retries", s.retries),
        ("HTTP 429", s.http_429), ("wall time", f"{s.wall_s:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    for reason, n in sorted(s.reject_reasons.items()):
        table.add_row(f"  rejected {reason}", str(n))
    console.print(table)
    for problem in result.problems[:10]:
        if problem != run.failure:
            console.print(f"[yellow]problem:[/] {escape(problem)}", highlight=False,
                          soft_wrap=True)
    console.print(f"table: {job.sink.uri} ({job.sink.table}); rejects in {job.sink.rejects_table}")
    if getattr(run, "report_path", None):
        console.print(f"report: {run.report_path}")


def cmd_run(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    show = not args.quiet and console.is_terminal
    progress, update = _progress_display(show)
    run = Run(job, retry_rejects=args.retry_rejects, allow_mass_delete=args.allow_mass_delete,
              on_progress=update)
    if progress is not None:
        with progress:
            result = anyio.run(run.execute)
    else:
        result = anyio.run(run.execute)
    if args.report:
        text = json.dumps(run.report(run_status(result.exit_code), result.exit_code),
                          default=str)
        if args.report == "-":
            print(text)
        else:
            Path(args.report).write_text(text + "\n", encoding="utf-8")
    if not args.quiet:
        _summary(job, result, run)
    if run.failure is not None:
        console.print(f"[red]run failed:[/] {escape(run.failure)}", highlight=False,
                      soft_wrap=True)
    if result.exit_code == EXIT_INTERRUPTED:
        s = result.stats
        left = s.files_new + s.files_changed - s.files_done
        more = "" if s.listing_done else " (and the rest of the listing, which was not finished)"
        console.print(f"[yellow]interrupted:[/] {left:,} files still to do{more}; what was "
                      "done is committed and the next run continues from there",
                      highlight=False, soft_wrap=True)
    if result.exit_code == 4 and run.quota_error is not None:
        delay = run.quota_error.retry_after_s
        when = (f"at {datetime.now(UTC) + timedelta(seconds=delay):%Y-%m-%d %H:%M:%S} UTC"
                if delay else "at midnight Pacific time (Google's daily reset)")
        console.print(f"[red]stopped:[/] per-day quota exhausted ({run.quota_error}); "
                      f"everything done so far is saved; the quota resets {when}: run the job "
                      "again then and it continues where it stopped", highlight=False)
    return result.exit_code


def cmd_search(args: argparse.Namespace) -> int:
    from pipeline.search import search

    job = load_job(args.job)
    file = Path(args.file) if args.file else None
    hits = anyio.run(lambda: search(job, args.query, k=args.k, where=args.where, file=file))
    table = Table(show_lines=False)
    for col in ("#", "score", "source", "where", "modality", "text"):
        table.add_column(col)
    for rank, hit in enumerate(hits, 1):
        table.add_row(str(rank), f"{hit['score']:.3f}", hit["key"] or hit["uri"],
                      hit["where"], hit["modality"], (hit["text"] or "")[:80].replace("\n", " "))
    out.print(table)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.plan import make_plan

    job = load_job(args.job)
    # SIGTERM ends a plan as Ctrl-C does: its worker processes are ended on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    figures = make_plan(job, retry_rejects=args.retry_rejects,
                        allow_mass_delete=args.allow_mass_delete).as_dict(job)
    if args.json:
        print(json.dumps(figures))
        return 0
    out.print(f"[bold]plan for job {job.name}[/] ({job.embed.model}), no API call made",
              highlight=False)
    out.print("files: " + ", ".join(f"{k} {v:,}" for k, v in figures["files"].items()))
    table = Table()
    for col in ("modality", "items", "est. tokens", "est. cost USD"):
        table.add_column(col, justify="right" if col != "modality" else "left")
    prices = figures["prices_usd_per_million_tokens"]
    for modality, n in sorted(figures["items"].items()):
        tokens = figures["tokens"].get(modality, 0)
        price = prices.get(modality, prices.get("text", 0.0))
        table.add_row(modality, f"{n:,}", f"{tokens:,}", f"{tokens * price / 1e6:.4f}")
    table.add_row("total", f"{sum(figures['items'].values()):,}",
                  f"{figures['tokens_total']:,}", f"{figures['cost_usd']:.4f}")
    out.print(table)
    out.print(f"PDF pages {figures['pdf_pages']:,}; audio {figures['audio_seconds']:,} s; "
              f"video {figures['video_seconds']:,} s; rejects "
              f"{figures['rejects'] or 'none'}; Batch API cost {figures['cost_usd_batch_api']:.4f}")
    bound = figures["quota_bound_minutes"]
    out.print(f"wall time under the job's quotas: at least {bound:,} min" if bound is not None
              else "wall time: no quota set in the job (embed.quota), so none is estimated")
    if figures["days_by_requests_per_day"]:
        out.print(f"requests/day quota: {figures['days_by_requests_per_day']} day(s)")
    if figures["delete_refusal"]:
        out.print(f"[yellow]a run would fail:[/] {figures['delete_refusal']}", highlight=False)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.search import table_status

    job = load_job(args.job)
    status = table_status(job)
    if args.json:
        print(json.dumps(status, default=str))
        return 0
    out.print(f"[bold]{job.name}[/]: {status['uri']}", highlight=False)
    out.print("rows: " + ", ".join(f"{k} {v if v is not None else '-'}"
                                   for k, v in status["rows"].items()), highlight=False)
    out.print("files: " + (", ".join(f"{k} {v}" for k, v in status["files"].items()) or "none"))
    table = Table(title="last runs")
    cols = ("run_id", "status", "exit_code", "started", "files_seen", "files_new",
            "files_changed", "files_deleted", "items_embedded", "rejects", "tokens", "api_calls",
            "http_429")
    for col in cols:
        table.add_column(col.replace("_", " "))
    for run in status["runs"]:
        table.add_row(*(f"{run[c]:%Y-%m-%d %H:%M:%S}" if c == "started" and run[c] else
                        str(run[c]) for c in cols))
    out.print(table)
    pending = status["pending"]
    if pending is not None:
        left = ("an unknown number of files (it was killed before its listing finished)"
                if pending["files"] is None else f"{pending['files']:,} files")
        out.print(f"[yellow]last run {pending['run_id']} is {pending['status']}:[/] {left} "
                  "still to do; run the job again to continue", highlight=False, soft_wrap=True)
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from pipeline.emulator.server import Emulator, EmulatorOptions

    options = EmulatorOptions(
        api_key=args.api_key, auth=args.auth, latency_ms=args.latency_ms,
        per_item_ms=args.per_item_ms, jitter_ms=args.jitter_ms, rpm=args.rpm, tpm=args.tpm,
        rpd=args.rpd, window_s=args.window_s, day_s=args.day_s, error_429=args.error_429,
        error_500=args.error_500,
        error_503=args.error_503, reset=args.reset, stall=args.stall, stall_s=args.stall_s,
        truncate=args.truncate, seed=args.seed)
    console.print(f"emulator on http://{args.host}:{args.port} (Ctrl-C to stop)")
    Emulator(options, host=args.host, port=args.port).serve_forever()
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from pipeline.samples import make_quickstart_media, make_text_corpus

    folder = Path(args.folder)
    made = make_text_corpus(folder, args.texts) if args.texts else make_quickstart_media(folder)
    console.print(f"wrote {len(made)} files under {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedpipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job: embed what is new or changed")
    run.add_argument("job")
    run.add_argument("--retry-rejects", action="store_true",
                     help="try files rejected by earlier runs again even if unchanged")
    run.add_argument("--allow-mass-delete", action="store_true",
                     help="delete the rows of removed files even when they are more than "
                          "run.max_delete_fraction of the job's files (or all of them)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    run.add_argument("--report", metavar="PATH", default=None,
                     help="write the run's figures as JSON to PATH ('-' for stdout)")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="what a run would do and cost, without calling the API")
    plan.add_argument("job")
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--retry-rejects", action="store_true")
    plan.add_argument("--allow-mass-delete", action="store_true",
                      help="plan as `run --allow-mass-delete` would run")
    plan.set_defaults(func=cmd_plan)

    search = sub.add_parser("search", help="nearest rows to a text query")
    search.add_argument("job")
    search.add_argument("query", nargs="?", default=None, help="the query text")
    search.add_argument("--file", default=None,
                        help="a query file (image, audio, video, PDF), alone or with the text")
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--where", default=None, help="a Lance filter, e.g. \"modality = 'text'\"")
    search.set_defaults(func=cmd_search)

    status = sub.add_parser("status", help="the last runs and what the job's tables hold")
    status.add_argument("job")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    emu = sub.add_parser("emulator", help="serve the Gemini-compatible emulator")
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--port", type=int, default=8765)
    emu.add_argument("--api-key", default=None, help="require this key (default: none)")
    emu.add_argument("--auth", choices=("google", "bearer", "raw", "any"), default="any")
    emu.add_argument("--latency-ms", type=float, default=0.0)
    emu.add_argument("--per-item-ms", type=float, default=0.0)
    emu.add_argument("--jitter-ms", type=float, default=0.0)
    emu.add_argument("--rpm", type=int, default=None, help="requests/min quota (items count)")
    emu.add_argument("--tpm", type=int, default=None, help="input tokens/min quota")
    emu.add_argument("--rpd", type=int, default=None, help="requests/day quota (items count)")
    emu.add_argument("--window-s", type=float, default=60.0, help="length of the quota 'minute'")
    emu.add_argument("--day-s", type=float, default=86_400.0, help="length of the quota 'day'")
    for fault in ("error-429", "error-500", "error-503", "reset", "stall", "truncate"):
        emu.add_argument(f"--{fault}", type=float, default=0.0, metavar="RATE",
                         help=f"share of calls answered with: {fault}")
    emu.add_argument("--stall-s", type=float, default=30.0)
    emu.add_argument("--seed", type=int, default=None)
    emu.set_defaults(func=cmd_emulator)
    samples = sub.add_parser("samples", help="write generated sample files (images, a PDF)")
    samples.add_argument("folder")
    samples.add_argument("--texts", type=int, default=0,
                         help="write this many small text files instead")
    samples.set_defaults(func=cmd_samples)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse leaves an optional positional that follows options unparsed: the query text.
    if args.command == "search" and args.query is None and len(extra) == 1 \
            and not extra[0].startswith("-"):
        args.query, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.log_format, args.verbose)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except JobLocked as exc:
        console.print(f"[red]locked:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_LOCKED
    except PipelineError as exc:
        console.print(f"[red]run failed:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.print("interrupted")
        return EXIT_INTERRUPTED


def _entry() -> Any:
    code = main()
    if threads_left():
        # A parser the run gave up on is still running in a thread nothing can end; the
        # interpreter would wait for it at exit. Everything is committed and printed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _entry()
