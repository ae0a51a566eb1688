"""The ``embedpipe`` command: builds the parser from the verbs of :mod:`pipeline.commands`
and dispatches to them; every way out of the process sets its exit code here.

    embedpipe run JOB.yaml            embed what is new or changed; exit codes below
    embedpipe plan JOB.yaml           what a run would do and cost, no API call
    embedpipe search JOB.yaml QUERY   nearest rows to a text query
    embedpipe schema                  the job file's JSON Schema

Exit codes (the EPILOG below): 0 done (rejects included); 2 bad job file or usage; 3 the run
failed (no file's fault); 4 a quota or balance is exhausted; 5 locked; 6 Batch API jobs left
running; 70 internal error; 130 interrupted. 1 is never ours: it means Python crashed.

The commands (and :mod:`pipeline.commands.tables`) are the only modules that print or import
rich; the pipeline reports through RunStats.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from pipeline.commands import VERBS
from pipeline.commands.common import (
    JSON_LOGS,
    Parser,
    consoles,
    load_job,
    notice,
    setup_logging,
    wants_json,
)
from pipeline.errors import ConfigError, PipelineError
from pipeline.outcome import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_USAGE,
    exit_code_for,
)
from pipeline.state.lock import JobLocked

__all__ = ["build_parser", "internal_error", "load_job", "main", "notice"]

# Only what --help and --version need is imported at the top: each command imports its own
# (the run's stack, Lance, pyarrow, rich) when it runs. `benchmarks: bench/startup.py`.

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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("embedpipe")
    except PackageNotFoundError:
        return "unknown (not installed)"


def verb_modules() -> list[ModuleType]:
    """The verbs' modules, in the order ``--help`` lists them."""
    return [importlib.import_module(f"pipeline.commands.{name}") for name in VERBS]


def build_parser() -> argparse.ArgumentParser:
    # -v and --log-format work before or after the subcommand: each subcommand takes them too,
    # with no default of its own (SUPPRESS), so one given after it wins and none does no harm.
    common = Parser(add_help=False)
    common.add_argument("--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
                        help="text (default) or json: one JSON object per line on stderr")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log each stage's progress (info level)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress display, no summary (run)")
    parser = Parser(
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
    for verb in verb_modules():
        command = sub.add_parser(
            verb.NAME, help=verb.HELP, description=verb.HELP[0].upper() + verb.HELP[1:] + ".",
            epilog=f"example:\n  {verb.EXAMPLE}", parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter)
        verb.arguments(command)
        command.set_defaults(func=verb.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    JSON_LOGS["on"] = wants_json(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    # argparse leaves an optional positional that follows options unparsed: the query text.
    if args.command == "search" and args.query is None and len(extra) == 1 \
            and not extra[0].startswith("-"):
        args.query, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.log_format, args.verbose)
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
    if JSON_LOGS["on"]:
        notice("internal error", text, traceback=trace)
    elif logging.getLogger().isEnabledFor(logging.INFO):  # -v
        notice("internal error", text)
        consoles.err.print(trace, markup=False, highlight=False, style="dim")
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
    # The process's own: vectors are small, and OpenBLAS's idle threads spin on the CPU a
    # run needs (1 % of a text run's); set before numpy is imported. The user's setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
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
