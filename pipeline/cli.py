"""The ``embedpipe`` command.

    embedpipe run JOB.yaml            embed what is new or changed; exit codes below
    embedpipe search JOB.yaml QUERY   nearest rows to a text query
    embedpipe status JOB.yaml         what the job's tables hold
    embedpipe report JOB.yaml --html  the run history as one self-contained HTML page
    embedpipe emulator                serve the Gemini-compatible emulator in the foreground

Exit codes (the EPILOG below): 0 done (rejects included); 2 bad job file or usage; 3 the run
failed (no file's fault); 4 a quota or balance is exhausted; 5 locked; 6 Batch API jobs left
running; 70 internal error; 130 interrupted. 1 is never ours: it means Python crashed.

This module and pipeline/views.py (what the commands show) are the only ones that print or import
rich; the pipeline reports through RunStats.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pipeline.errors import ConfigError, PipelineError
from pipeline.outcome import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_PENDING,
    EXIT_USAGE,
    exit_code_for,
)
from pipeline.state.lock import JobLocked
from pipeline.terminal import plural, printable

if TYPE_CHECKING:
    from rich.console import Console

# Only what --help and --version need is imported at the top: each command imports its own
# (the run's stack, Lance, pyarrow, rich) when it runs. `benchmarks: bench/startup.py`.


class _Consoles:
    """stderr and stdout rich consoles, made when first used."""

    @functools.cached_property
    def err(self) -> Console:
        from rich.console import Console

        return Console(stderr=True)

    @functools.cached_property
    def out(self) -> Console:
        from rich.console import Console

        return Console()


_consoles = _Consoles()


def _views() -> Any:
    """pipeline.views (rich tables; it imports the run's stack)."""
    from pipeline import views

    return views


def load_job(path: str | Path, overrides: dict[tuple[str, ...], Any] | None = None) -> Any:
    from pipeline.config import load_job as load

    return load(path, overrides=overrides)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# What every JSON log line says it is about (set as soon as it is known).
CONTEXT: dict[str, str | None] = {"job": None, "run_id": None}
_JSON = {"on": False}  # --log-format json: stderr holds JSON lines only


def _json_line(level: str, event: str, **fields: Any) -> str:
    return json.dumps({"ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                       "level": level, "event": event, **CONTEXT, **fields}, default=str)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = {"error": self.formatException(record.exc_info)} if record.exc_info else {}
        return _json_line(record.levelname.lower(), record.getMessage(), logger=record.name,
                          **extra)


def notice(kind: str, text: str, **fields: Any) -> None:
    """A message for the operator on stderr: ``kind: text`` in colour, or one JSON line
    (``event`` is the kind, ``message`` the text) with ``--log-format json``."""
    if _JSON["on"]:
        level = ("error" if kind in ("error", "run failed", "locked", "stopped", "internal error")
                 else "warning")
        print(_json_line(level, kind, message=text, **fields), file=sys.stderr, flush=True)
        return
    colour = "red" if kind in ("error", "run failed", "locked", "stopped",
                               "internal error") else "yellow"
    _consoles.err.print(f"[{colour}]{kind}:[/] {_escape(printable(text))}", highlight=False,
                  soft_wrap=True)


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one JSON line (exit 2) under ``--log-format json``:
    a log shipper must never meet a line it cannot parse."""

    def error(self, message: str) -> NoReturn:
        if _JSON["on"]:
            notice("error", message, usage=" ".join(self.format_usage().split()))
            self.exit(EXIT_USAGE)
        super().error(message)


def _wants_json(argv: Sequence[str]) -> bool:
    """``--log-format json`` on the line, read before argparse (which may fail first)."""
    args = list(argv)
    return "--log-format=json" in args or any(
        a == "--log-format" and b == "json" for a, b in itertools.pairwise(args))


def _setup_logging(fmt: str, verbose: bool) -> None:
    _JSON["on"] = fmt == "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler],
                        force=True)
    for noisy in ("httpx", "httpcore", "uvicorn", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _answer(args: argparse.Namespace, data: Any, table: Callable[[], None]) -> int:
    """What a reading command found: one JSON document with ``--json``, else ``table()``."""
    if args.json:
        print(json.dumps(data, default=str))
    else:
        table()
    return 0


def _overrides(args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    """``--set`` and ``--emulator`` as load_job's overrides."""
    from pipeline.config.loading import parse_overrides

    overrides = parse_overrides(args.set)
    if args.emulator:
        overrides[("embed", "provider")] = "emulator"
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    if args.engine or args.address:  # shorthands for --set run.engine=... run.ray_address=...
        overrides[("run", "engine")] = args.engine or "ray"
    if args.address:
        overrides[("run", "ray_address")] = args.address
    import anyio

    from pipeline.memory import tune_for_long_run
    from pipeline.run import Run

    # SIGTERM before the engine takes over its signals (joining a cluster, opening the sink)
    # ends the run as Ctrl-C does: exit 130, the runs row says so.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    job = load_job(args.job, overrides=overrides)
    CONTEXT["job"] = job.name
    tune_for_long_run()  # this process is the run's: before any worker thread starts
    show = not args.quiet and _consoles.err.is_terminal and not _JSON["on"]
    progress, update = _views().progress_display(_consoles.err, show)
    run = Run(job, retry_rejects=args.retry_rejects, allow_mass_delete=args.allow_mass_delete,
              detach=args.detach, on_progress=update)
    CONTEXT["run_id"] = run.stats.run_id
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
    if _JSON["on"]:  # the summary as one line a log pipeline can read
        level = "info" if result.exit_code in (0, EXIT_PENDING) else "error"
        print(_json_line(level, "run ended", **result.report), file=sys.stderr, flush=True)
    elif not args.quiet:
        _views().show_summary(_consoles.err, job, result, run)
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
    return result.exit_code


def cmd_search(args: argparse.Namespace) -> int:
    import anyio

    from pipeline.search import search

    job = load_job(args.job, overrides=_overrides(args))
    file = Path(args.file) if args.file else None
    hits = anyio.run(lambda: search(job, args.query, k=args.k, where=args.where, file=file))
    return _answer(args, hits, lambda: _views().show_hits(_consoles.out, hits, wide=args.wide))


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.plan import make_plan

    job = load_job(args.job, overrides=_overrides(args))
    # SIGTERM ends a plan as Ctrl-C does: its worker processes are ended on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    figures = make_plan(job, retry_rejects=args.retry_rejects,
                        allow_mass_delete=args.allow_mass_delete).as_dict(job)
    return _answer(args, figures, lambda: _views().show_plan(_consoles.out, job, figures))


def cmd_check(args: argparse.Namespace) -> int:
    import anyio

    from pipeline.check import check_job, passed

    job = load_job(args.job, overrides=_overrides(args))
    findings = anyio.run(check_job, job)
    code = 0 if passed(findings) else EXIT_FAILED
    if args.json:
        print(json.dumps({"ok": code == 0, "findings": [f.as_dict() for f in findings]}))
    else:
        _views().show_check(_consoles.out, job, findings)
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.search import table_status

    job = load_job(args.job)
    status = table_status(job)
    return _answer(args, status, lambda: _views().show_status(_consoles.out, job, status, wide=args.wide))


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.history import run_history

    history = run_history(load_job(args.job), last=args.last)
    if args.html:
        from pipeline.atomic import write_text_atomic
        from pipeline.report_page import render_html

        path = Path(args.html)
        try:
            write_text_atomic(path, render_html(history, datetime.now(UTC)))
        except OSError as exc:
            raise ConfigError(f"--html {path}: cannot write it: {exc.strerror or exc}") from exc
        _consoles.err.print(f"wrote {_escape(str(path))}: {plural(len(history.runs), 'run')}, "
                      f"{history.rejects_total:,} rejects", highlight=False, soft_wrap=True)
        return 0
    return _answer(args, history.as_dict(),
                   lambda: _views().show_history(_consoles.out, history, wide=args.wide))


def cmd_init(args: argparse.Namespace) -> int:
    from pipeline.scaffold import write_job_file

    path, found = write_job_file(args.source, Path(args.out) if args.out else None, args.name,
                                 args.force)
    _consoles.err.print(f"wrote {path}: {found}", highlight=False, soft_wrap=True)
    _consoles.err.print(f"next: embedpipe plan {path}   (then: embedpipe run {path})", highlight=False)
    return 0


def cmd_rejects(args: argparse.Namespace) -> int:
    from pipeline.rejects import list_rejects

    rows = list_rejects(load_job(args.job), args.reason)
    return _answer(args, rows, lambda: _views().show_rejects(_consoles.out, rows, wide=args.wide))


def cmd_batches(args: argparse.Namespace) -> int:
    import anyio

    from pipeline.batches import batch_jobs

    job = load_job(args.job)
    rows = anyio.run(lambda: batch_jobs(job, cancel=args.cancel))
    return _answer(args, rows, lambda: _views().show_batches(_consoles.out, job, rows,
                                                               wide=args.wide))


def cmd_emulator(args: argparse.Namespace) -> int:
    from pipeline.emulator.server import Emulator, EmulatorOptions

    options = EmulatorOptions(
        api_key=args.api_key, auth=args.auth, latency_ms=args.latency_ms,
        per_item_ms=args.per_item_ms, jitter_ms=args.jitter_ms, rpm=args.rpm, tpm=args.tpm,
        rpd=args.rpd, window_s=args.window_s, day_s=args.day_s, error_429=args.error_429,
        error_500=args.error_500,
        error_503=args.error_503, reset=args.reset, stall=args.stall, stall_s=args.stall_s,
        truncate=args.truncate, seed=args.seed, batch_delay_s=args.batch_delay_s,
        batch_outcome=args.batch_outcome, batch_error_rate=args.batch_error_rate)
    gateway = None
    if args.gateway:
        from pipeline.emulator.gateway import GatewayOptions

        # The key and auth style are the gateway's token then; the emulator behind it is open.
        gateway = GatewayOptions(flavour=args.gateway, token=args.api_key, auth=args.auth,
                                 balance_tokens=args.balance_tokens, rate_limit=args.rate_limit,
                                 rate_limit_body=args.rate_limit_body,
                                 no_channel=tuple(args.no_channel), seed=args.seed)
        options = replace(options, api_key=None, auth="any")
    try:
        Emulator(options, host=args.host, port=args.port, gateway=gateway).serve_forever(
            lambda url: _consoles.err.print(f"emulator on {url} (Ctrl-C to stop)"))
    except OSError as exc:
        notice("error", f"cannot listen on {args.host}:{args.port}: "
                        f"{exc.strerror or exc} (another process has the port? try --port)")
        return EXIT_USAGE
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from pipeline.samples import make_quickstart_media, make_text_corpus

    folder = Path(args.folder)
    try:
        made = (make_text_corpus(folder, args.texts) if args.texts is not None
                else make_quickstart_media(folder))
    except OSError as exc:
        notice("error", f"cannot write samples under {folder}: {exc.strerror or exc}")
        return EXIT_USAGE
    _consoles.err.print(f"wrote {len(made)} files under {folder}")
    return 0


DESCRIPTION = """\
Turn a corpus of files (text, PDFs, images, audio, video) into Gemini embeddings stored in
Lance tables. A job file (YAML) names the source, the model and the table; each `run` embeds
only what is new or changed since the last one, deletes the rows of files that are gone, and
can be killed at any moment and run again without a duplicate or a lost row."""

EPILOG = """\
exit codes:
  0    done: every file embedded, or rejected for a reason of its own (the summary, the
       report and `embedpipe rejects JOB` list them)
  2    bad job file or usage (nothing was done)
  3    the run failed for a reason that is no file's: the key, the endpoint, the network, a
       missing source, an unwritable sink, deletions refused; nothing stored against any
       file, nothing deleted; run again once fixed
  4    a per-day quota is exhausted, a gateway's balance is used up, or the endpoint kept
       answering 429: work so far is saved; run again later
  5    another run of the job (or into the same table) is under way
  6    `run --detach` left Batch API jobs running (the next run collects them)
  70   internal error (a bug): one line says what; nothing deleted; the next run continues
  130  interrupted (what was committed stays; the next run continues)
  1 is never embedpipe's: it is Python's (and Ray's) exit status for a crash.

examples:
  embedpipe plan jobs/nightly.yaml           what a run would do and cost, no API call
  embedpipe run jobs/nightly.yaml -v         embed what changed, with per-stage logs
  embedpipe search jobs/nightly.yaml "harbour at night" -k 3 --json
  embedpipe status jobs/nightly.yaml         the last runs and what the tables hold
  embedpipe report jobs/nightly.yaml --html history.html   charts of the last runs"""

JOB_HELP = "the job file (YAML)"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {value})")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("embedpipe")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _job_settings(command: argparse.ArgumentParser, set_help: str) -> None:
    """``--set`` and ``--emulator``, read by :func:`_overrides`, for a command that loads the
    job's settings to act on them (run, plan, check, search)."""
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help=set_help)
    command.add_argument("--emulator", action="store_true",
                         help="use the built-in emulator instead of the job's endpoint "
                              "(offline; the same as --set embed.provider=emulator)")


def build_parser() -> argparse.ArgumentParser:
    # -v and --log-format work before or after the subcommand: each subcommand takes them too,
    # with no default of its own (SUPPRESS), so one given after it wins and none does no harm.
    common = _Parser(add_help=False)
    common.add_argument("--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
                        help="text (default) or json: one JSON object per line on stderr")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log each stage's progress (info level)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress display, no summary (run)")
    parser = _Parser(
        prog="embedpipe", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    # The same options with their defaults (argparse shares action objects between a parser
    # and its parents: set_defaults here would change the subcommands' too).
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text (default) or json: one JSON object per line on stderr")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log each stage's progress (info level)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress display, no summary (run)")
    parser.add_argument("--version", action="version", version=f"embedpipe {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text[0].upper() +
                              help_text[1:] + ".", epilog=f"example:\n  {example}",
                              parents=[common],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    run = command("run", "run a job: embed what is new or changed",
                  "embedpipe run jobs/nightly.yaml --report run.json")
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
    _job_settings(run, "override a job key for this run, checked like the file's own "
                       "(repeatable): --set embed.concurrency=8 --set run.flush_rows=500")
    run.add_argument("--report", metavar="PATH", default=None,
                     help="write the run's figures as JSON to PATH ('-' for stdout)")
    run.set_defaults(func=cmd_run)

    plan = command("plan", "what a run would do and cost, without calling the API",
                   "embedpipe plan jobs/nightly.yaml --json")
    plan.add_argument("job", help=JOB_HELP)
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.add_argument("--retry-rejects", action="store_true",
                      help="plan as `run --retry-rejects` would run")
    _job_settings(plan, "plan with a job key overridden, as `run --set` would (repeatable)")
    plan.add_argument("--allow-mass-delete", action="store_true",
                      help="plan as `run --allow-mass-delete` would run")
    plan.set_defaults(func=cmd_plan)

    check = command("check", "a preflight of the job's endpoint with one tiny call: key, auth "
                    "style, model, dimensions, task input, Batch API, latency",
                    "embedpipe check jobs/nightly.yaml --json")
    check.add_argument("job", help=JOB_HELP)
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    _job_settings(check, "check with a job key overridden, as `run --set` would (repeatable)")
    check.set_defaults(func=cmd_check)

    search = command("search", "the rows nearest to a text query (or a query file)",
                     "embedpipe search jobs/nightly.yaml \"harbour at night\" -k 3 "
                     "--where \"modality = 'image'\"")
    search.add_argument("job", help=JOB_HELP)
    search.add_argument("query", nargs="?", default=None, help="the query text")
    search.add_argument("--file", default=None,
                        help="a query file (image, audio, video, PDF), alone or with the text")
    search.add_argument("-k", type=_positive, default=5, help="how many rows (default 5)")
    search.add_argument("--json", action="store_true",
                        help="print the rows as a JSON array (every column, full text)")
    search.add_argument("--wide", action="store_true",
                        help="wrap long sources and texts instead of cutting them")
    search.add_argument("--where", default=None, help="a Lance filter, e.g. \"modality = 'text'\"")
    _job_settings(search, "search with a job key overridden, as `run --set` (repeatable)")
    search.set_defaults(func=cmd_search)

    status = command("status", "the last runs and what the job's tables hold",
                     "embedpipe status jobs/nightly.yaml --json")
    status.add_argument("job", help=JOB_HELP)
    status.add_argument("--json", action="store_true", help="print it as one JSON object")
    status.add_argument("--wide", action="store_true",
                        help="every column of the runs table, however wide")
    status.set_defaults(func=cmd_status)

    report = command("report", "the job's run history: figures per run as a table, JSON or "
                     "one self-contained HTML page with charts",
                     "embedpipe report jobs/nightly.yaml --html history.html --last 60")
    report.add_argument("job", help=JOB_HELP)
    report.add_argument("--html", metavar="PATH", default=None,
                        help="write the page to PATH (opens offline: nothing is fetched)")
    report.add_argument("--last", type=_positive, default=30, metavar="N",
                        help="how many of the latest runs (default 30)")
    report.add_argument("--json", action="store_true",
                        help="print the runs and latest rejects as one JSON object")
    report.add_argument("--wide", action="store_true",
                        help="every column of the runs table, however wide")
    report.set_defaults(func=cmd_report)

    init = command("init", "write a commented job file for a folder or a bucket",
                   "embedpipe init ~/archive/scans --name scans --out jobs/scans.yaml")
    init.add_argument("source", help="a folder, or s3://bucket/prefix (credentials from the "
                                     "AWS_* environment, AWS_ENDPOINT_URL for other stores)")
    init.add_argument("--name", default=None, help="the job's name (default: the folder's)")
    init.add_argument("--out", default=None, metavar="PATH",
                      help="where to write it (default: NAME.yaml here)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=cmd_init)

    rejects = command("rejects", "the job's rejected files and parts, why, and what to do",
                      "embedpipe rejects jobs/nightly.yaml --reason encrypted")
    rejects.add_argument("job", help=JOB_HELP)
    rejects.add_argument("--reason", default=None,
                         help="only this reason (corrupt, encrypted, unsupported, too_long, "
                              "too_large, unreadable, empty, timeout, api_rejected)")
    rejects.add_argument("--json", action="store_true",
                         help="print them as a JSON array, each with its fix")
    rejects.add_argument("--wide", action="store_true",
                         help="wrap long names and messages instead of cutting them")
    rejects.set_defaults(func=cmd_rejects)

    batches = command("batches", "the job's Batch API jobs (and cancelling them)",
                      "embedpipe batches jobs/backfill.yaml --json")
    batches.add_argument("job", help=JOB_HELP)
    batches.add_argument("--cancel", action="store_true",
                         help="cancel the open jobs; their items are submitted again next run")
    batches.add_argument("--json", action="store_true", help="print them as a JSON array")
    batches.add_argument("--wide", action="store_true",
                         help="every column at its natural width, however wide")
    batches.set_defaults(func=cmd_batches)

    emu = command("emulator", "serve the Gemini-compatible emulator (for offline runs and tests)",
                  "embedpipe emulator --port 8765 --latency-ms 100 --rpm 3000")
    emu.add_argument("--host", default="127.0.0.1", help="address to listen on")
    emu.add_argument("--port", type=int, default=8765, help="port to listen on")
    emu.add_argument("--api-key", default=None, help="require this key (default: none)")
    emu.add_argument("--auth", choices=("google", "bearer", "raw", "any"), default="any",
                     help="how the key must be sent: x-goog-api-key, Authorization: Bearer, "
                          "a raw Authorization header, or any of them")
    emu.add_argument("--latency-ms", type=float, default=0.0, help="added to every call")
    emu.add_argument("--per-item-ms", type=float, default=0.0,
                     help="added per item of a batch call")
    emu.add_argument("--jitter-ms", type=float, default=0.0, help="random extra latency, up to")
    emu.add_argument("--rpm", type=int, default=None, help="requests/min quota (items count)")
    emu.add_argument("--tpm", type=int, default=None, help="input tokens/min quota")
    emu.add_argument("--rpd", type=int, default=None, help="requests/day quota (items count)")
    emu.add_argument("--window-s", type=float, default=60.0, help="length of the quota 'minute'")
    emu.add_argument("--day-s", type=float, default=86_400.0, help="length of the quota 'day'")
    for fault in ("error-429", "error-500", "error-503", "reset", "stall", "truncate"):
        emu.add_argument(f"--{fault}", type=float, default=0.0, metavar="RATE",
                         help=f"share of calls answered with: {fault}")
    emu.add_argument("--stall-s", type=float, default=30.0,
                     help="how long a stalled call hangs before its answer")
    emu.add_argument("--seed", type=int, default=None, help="seed of the fault draws")
    emu.add_argument("--batch-delay-s", type=float, default=1.0,
                     help="Batch API: seconds from submission to results")
    emu.add_argument("--batch-outcome", choices=("succeed", "fail", "expire"),
                     default="succeed", help="Batch API: how every job ends")
    emu.add_argument("--batch-error-rate", type=float, default=0.0, metavar="RATE",
                     help="Batch API: share of requests answered with a transient error")
    gw = emu.add_argument_group(
        "playing a gateway", "serve as an OpenAI-style gateway (new-api / one-api) in front of "
        "the emulator: only embedContent and batchEmbedContents are routed, errors come in "
        "OpenAI's shape without retry information; --api-key and --auth are the gateway token's")
    gw.add_argument("--gateway", choices=("new-api", "plain"), default=None,
                    help="new-api: its answers to unrouted paths (500 on the Batch API's "
                         "create, an HTML page on uploads, 404 elsewhere); plain: 404 to all")
    gw.add_argument("--balance-tokens", type=int, default=None, metavar="N",
                    help="the account's balance: after N input tokens, 403 "
                         "insufficient_user_quota")
    gw.add_argument("--rate-limit", type=float, default=0.0, metavar="RATE",
                    help="share of embed calls refused by the gateway's own limit (429, no "
                         "retry information)")
    gw.add_argument("--rate-limit-body", choices=("sentence", "empty"), default="sentence",
                    help="that 429's body: new-api's fixed sentence, or nothing")
    gw.add_argument("--no-channel", action="append", default=[], metavar="MODEL",
                    help="a model no channel serves (503 model_not_found; repeatable)")
    emu.set_defaults(func=cmd_emulator)
    samples = command("samples", "write generated sample files (texts, images, a PDF)",
                      "embedpipe samples jobs/samples/quickstart/generated")
    samples.add_argument("folder", help="where to write them (made if missing)")
    samples.add_argument("--texts", type=_positive, default=None, metavar="N",
                         help="write N small text files instead of the images and PDF")
    samples.set_defaults(func=cmd_samples)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    _JSON["on"] = _wants_json(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    # argparse leaves an optional positional that follows options unparsed: the query text.
    if args.command == "search" and args.query is None and len(extra) == 1 \
            and not extra[0].startswith("-"):
        args.query, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.log_format, args.verbose)
    threading.excepthook = _thread_died
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        notice("error", str(exc))
        return EXIT_USAGE
    except JobLocked as exc:
        notice("locked", str(exc))
        return EXIT_LOCKED
    except PipelineError as exc:
        notice("run failed", str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        notice("interrupted", "stopped by the user")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line (one JSON line), never exit 1, nothing deleted
        internal_error(exc)
        return exit_code_for(exc)


def internal_error(exc: BaseException) -> None:
    """An error nobody planned for: its one-line summary for the operator, the traceback as a
    field under ``--log-format json`` (after the line otherwise)."""
    trace = "".join(traceback.format_exception(exc))
    text = (f"{type(exc).__name__}: {exc} (an internal error: please report it with this "
            "output; nothing was deleted, and the next run continues where this one stopped)")
    if _JSON["on"]:
        notice("internal error", text, traceback=trace)
    elif logging.getLogger().isEnabledFor(logging.INFO):  # -v
        notice("internal error", text)
        _consoles.err.print(trace, markup=False, highlight=False, style="dim")
    else:
        notice("internal error", text + " (-v shows the traceback)")


def _thread_died(hook: threading.ExceptHookArgs) -> None:
    """A thread's uncaught error goes through the application's logging (a JSON line under
    --log-format json), not Python's bare traceback on stderr."""
    if hook.exc_value is not None and not isinstance(hook.exc_value, SystemExit):
        name = hook.thread.name if hook.thread is not None else "?"
        logging.getLogger("embedpipe").error(
            "thread %s died: %s", name, hook.exc_value,
            exc_info=(hook.exc_type, hook.exc_value, hook.exc_traceback))


def _entry() -> Any:
    code = main()
    from pipeline.engine.threads import threads_left

    if threads_left():
        # A parser the run gave up on is still running in a thread nothing can end; the
        # interpreter would wait for it at exit. Everything is committed and printed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _entry()
