"""Rich tables that fit the console: the helpers the commands' output shares (columns dropped
from the right when the console is narrow, cells cut with an ellipsis, ``--wide`` tables at
their natural width). Imported by a command when it prints, never at start-up."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.terminal import printable

# The runs table's columns, most wanted first: at a narrow width the last ones are dropped
# (``--wide`` keeps them all; ``--json`` has everything).
RUN_COLUMNS = [("run_id", "run"), ("status", "status"), ("exit_code", "exit"),
               ("started", "started (UTC)"), ("items_embedded", "items"), ("rejects", "rejects"),
               ("files_seen", "files"), ("files_new", "new"), ("files_changed", "changed"),
               ("files_deleted", "deleted"), ("api_calls", "calls"), ("tokens", "tokens"),
               ("http_429", "429s")]


def cell(run: dict[str, Any], column: str) -> str:
    value = run[column]
    if value is None:
        return "-"
    if column == "started":
        return f"{value:%m-%d %H:%M}"
    return f"{value:,}" if isinstance(value, int) and column != "exit_code" else str(value)


def natural_width(out: Console, table: Table) -> int:
    """How wide ``table`` is with no column cut or wrapped."""
    return out.measure(table, options=out.options.update_width(100_000)).maximum


def fitted(out: Console, columns: list[tuple[str, str]], rows: list[dict[str, Any]],
           wide: bool = False, **table_args: Any) -> tuple[Table, int]:
    """A table of as many of ``columns`` (in priority order) as fit the console's width,
    and how many were left out."""
    for n in range(len(columns), 0, -1):
        table = Table(**table_args)
        for _, header in columns[:n]:
            table.add_column(header, no_wrap=True)
        for row in rows:
            table.add_row(*(cell(row, c) for c, _ in columns[:n]))
        if wide or n == 1 or natural_width(out, table) <= out.width:
            return table, len(columns) - n
    raise AssertionError("unreachable")


def counts(by: dict[str, int] | None) -> str:
    """``{"corrupt": 2, "empty": 1}`` as ``corrupt 2, empty 1``."""
    return ", ".join(f"{k} {v:,}" for k, v in sorted((by or {}).items()))


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def shown(text: str) -> Text:
    """A table cell of data (a name, a message): control characters escaped, no markup read."""
    return Text(printable(text))


def print_wide(out: Console, table: Table, wide: bool) -> None:
    """``--wide`` tables at their natural width, however wide the console."""
    if not wide:
        out.print(table)
        return
    Console(file=out.file, width=max(natural_width(out, table), out.width), force_terminal=out.is_terminal,
            no_color=out.no_color).print(table)

