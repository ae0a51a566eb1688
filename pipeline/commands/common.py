"""What every command shares: the consoles, messages for the operator (``notice``), logging
(text or one JSON object per line), the answer of a reading command, and the options that
load a job (``--set``, ``--emulator``).

Only what ``--help`` needs is imported here: rich, the run's stack, Lance and pyarrow are
imported by a command when it runs (``bench/startup.py``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pipeline.outcome import EXIT_USAGE
from pipeline.terminal import printable

if TYPE_CHECKING:
    from rich.console import Console

JOB_HELP = "the job file (YAML)"
FAILING = ("error", "run failed", "locked", "stopped", "internal error")


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


consoles = _Consoles()

# What every JSON log line says it is about (set as soon as it is known).
CONTEXT: dict[str, str | None] = {"job": None, "run_id": None}
JSON_LOGS = {"on": False}  # --log-format json: stderr holds JSON lines only


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def json_line(level: str, event: str, **fields: Any) -> str:
    return json.dumps({"ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                       "level": level, "event": event, **CONTEXT, **fields}, default=str)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = {"error": self.formatException(record.exc_info)} if record.exc_info else {}
        return json_line(record.levelname.lower(), record.getMessage(), logger=record.name,
                         **extra)


def notice(kind: str, text: str, **fields: Any) -> None:
    """A message for the operator on stderr: ``kind: text`` in colour, or one JSON line
    (``event`` is the kind, ``message`` the text) with ``--log-format json``."""
    if JSON_LOGS["on"]:
        level = "error" if kind in FAILING else "warning"
        print(json_line(level, kind, message=text, **fields), file=sys.stderr, flush=True)
        return
    colour = "red" if kind in FAILING else "yellow"
    consoles.err.print(f"[{colour}]{kind}:[/] {escape(printable(text))}", highlight=False,
                       soft_wrap=True)


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one JSON line (exit 2) under ``--log-format json``:
    a log shipper must never meet a line it cannot parse."""

    def error(self, message: str) -> NoReturn:
        if JSON_LOGS["on"]:
            notice("error", message, usage=" ".join(self.format_usage().split()))
            self.exit(EXIT_USAGE)
        super().error(message)


def wants_json(argv: Sequence[str]) -> bool:
    """``--log-format json`` on the line, read before argparse (which may fail first)."""
    args = list(argv)
    return "--log-format=json" in args or any(
        a == "--log-format" and b == "json" for a, b in itertools.pairwise(args))


def setup_logging(fmt: str, verbose: bool) -> None:
    JSON_LOGS["on"] = fmt == "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler],
                        force=True)
    for noisy in ("httpx", "httpcore", "uvicorn", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def answer(args: argparse.Namespace, data: Any, table: Callable[[], None]) -> int:
    """What a reading command found: one JSON document with ``--json``, else ``table()``."""
    if args.json:
        print(json.dumps(data, default=str))
    else:
        table()
    return 0


def load_job(path: str | Path, overrides: dict[tuple[str, ...], Any] | None = None) -> Any:
    from pipeline.config import load_job as load

    return load(path, overrides=overrides)


def job_settings(command: argparse.ArgumentParser, set_help: str) -> None:
    """``--set`` and ``--emulator``, read by :func:`overrides`, for a command that loads the
    job's settings to act on them (run, plan, check, search)."""
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help=set_help)
    command.add_argument("--emulator", action="store_true",
                         help="use the built-in emulator instead of the job's endpoint "
                              "(offline; the same as --set embed.provider=emulator)")


def overrides(args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    """``--set`` and ``--emulator`` as load_job's overrides."""
    from pipeline.config.loading import parse_overrides

    found = parse_overrides(args.set)
    if args.emulator:
        found[("embed", "provider")] = "emulator"
    return found


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {value})")
    return value

