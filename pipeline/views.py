"""What the commands show a person: progress, the run summary, plan, status, search hits and
batch jobs as rich tables. The only module besides the CLI that imports rich."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pipeline.report_page import dollars, seconds
from pipeline.stats import RunStats
from pipeline.terminal import plural, printable

if TYPE_CHECKING:  # what the commands hand over; not imported to show it
    from pipeline.check import Finding
    from pipeline.config import JobConfig
    from pipeline.history import History
    from pipeline.run import Run, RunResult


def progress_display(console: Console, enabled: bool,
                     ) -> tuple[Progress | None, Callable[[RunStats], None] | None]:
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


def show_plan(out: Console, job: JobConfig, figures: dict[str, Any]) -> None:
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
    out.print(f"prices: {figures['prices_source']}", highlight=False)
    out.print(f"PDF pages {figures['pdf_pages']:,}; audio {figures['audio_seconds']:,} s; "
              f"video {figures['video_seconds']:,} s; rejects "
              f"{_counts(figures['rejects']) or 'none'}; Batch API cost "
              f"{figures['cost_usd_batch_api']:.4f}")
    out.print(f"a run would use the {figures['mode']} API (embed.mode: {job.embed.mode})",
              highlight=False)
    bound = figures["quota_bound_minutes"]
    out.print(f"wall time under the job's quotas: at least {bound:,} min" if bound is not None
              else "wall time: no quota set in the job (embed.quota), so none is estimated")
    if figures["days_by_requests_per_day"]:
        out.print(f"requests/day quota: {figures['days_by_requests_per_day']} day(s)")
    if figures.get("items_awaited"):
        out.print(f"{plural(figures['items_awaited'], 'item')} already submitted to the Batch "
                  "API by earlier runs: collected, not paid again (not in the cost above)",
                  highlight=False)
    if figures.get("items_reused"):
        out.print(f"{plural(figures['items_reused'], 'item')} send a request the table already "
                  "holds or another file sends too: reused, not paid again (not in the cost "
                  f"above; {figures['cost_saved_usd']:.4f} USD saved)", highlight=False)
    if figures.get("upgrade"):
        out.print(f"[bold]upgrade:[/] {escape(figures['upgrade'])}", highlight=False,
                  soft_wrap=True)
    if figures["delete_refusal"]:
        out.print(f"[yellow]a run would fail:[/] {figures['delete_refusal']}", highlight=False)


# The runs table's columns, most wanted first: at a narrow width the last ones are dropped
# (``--wide`` keeps them all; ``--json`` has everything).
RUN_COLUMNS = [("run_id", "run"), ("status", "status"), ("exit_code", "exit"),
               ("started", "started (UTC)"), ("items_embedded", "items"), ("rejects", "rejects"),
               ("files_seen", "files"), ("files_new", "new"), ("files_changed", "changed"),
               ("files_deleted", "deleted"), ("api_calls", "calls"), ("tokens", "tokens"),
               ("http_429", "429s")]


def _cell(run: dict[str, Any], column: str) -> str:
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
            table.add_row(*(_cell(row, c) for c, _ in columns[:n]))
        if wide or n == 1 or natural_width(out, table) <= out.width:
            return table, len(columns) - n
    raise AssertionError("unreachable")


def _counts(by: dict[str, int] | None) -> str:
    """``{"corrupt": 2, "empty": 1}`` as ``corrupt 2, empty 1``."""
    return ", ".join(f"{k} {v:,}" for k, v in sorted((by or {}).items()))


def show_status(out: Console, job: JobConfig, status: dict[str, Any], wide: bool = False) -> None:
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
    _print_wide(out, table, wide)
    if dropped:
        out.print(f"({dropped} more columns: --wide, or --json for everything)")
    pending = status["pending"]
    if pending is not None:
        left = ("an unknown number of files (it was killed before its listing finished)"
                if pending["files"] is None else f"{pending['files']:,} files")
        out.print(f"[yellow]last run {pending['run_id']} is {pending['status']}:[/] {left} "
                  "still to do; run the job again to continue", highlight=False, soft_wrap=True)


# The report's columns, most wanted first (the HTML page and --json have them all).
HISTORY_COLUMNS = [("run_id", "run"), ("status", "status"), ("started", "started (UTC)"),
                   ("items_embedded", "items"), ("files_done", "files"), ("cost_usd", "cost"),
                   ("rejects", "rejects"), ("wall_s", "wall"), ("latency_p50_s", "p50"),
                   ("latency_p95_s", "p95"), ("http_429", "429s"), ("retries", "retries")]


def show_history(out: Console, history: History, wide: bool = False) -> None:
    out.print(f"[bold]{escape(history.job)}[/]: the last {plural(len(history.runs), 'run')}",
              highlight=False)
    shown = {"cost_usd": dollars, "wall_s": seconds, "latency_p50_s": seconds,
             "latency_p95_s": seconds}
    rows = [{**run, **{c: None if run[c] is None else f(run[c]) for c, f in shown.items()}}
            for run in history.runs]
    table, dropped = fitted(out, HISTORY_COLUMNS, rows, wide)
    _print_wide(out, table, wide)
    if dropped:
        out.print(f"({dropped} more columns: --wide, --json, or --html for charts)")
    reasons: Counter[str] = Counter()
    for run in history.runs:
        reasons.update(run["reject_reasons"] or {})
    if reasons:
        out.print("rejected in these runs: " + ", ".join(f"{r} {n:,}"
                                                         for r, n in reasons.most_common()))


def show_batches(out: Console, job: JobConfig, rows: list[dict[str, Any]],
                 wide: bool = False) -> None:
    table = Table(title=f"Batch API jobs of {job.name}")
    for col in ("display name", "job", "status", "service", "items", "created"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["display_name"], row["name"] or "-", row["status"],
                      row.get("service_state", "-"), str(row["items"]),
                      f"{row['created']:%Y-%m-%d %H:%M}")
    _print_wide(out, table, wide)


def show_rejects(out: Console, rows: list[dict[str, Any]], wide: bool = False) -> None:
    """The rejects, one line each at the console's width, then what to do per reason."""
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
            name, message = _cut(name, key_w), _cut(message, message_w)
        table.add_row(Text(name), row["reason"], Text(message))
    _print_wide(out, table, wide)
    for reason, n in Counter(row["reason"] for row in rows).most_common():
        fix = next(r["fix"] for r in rows if r["reason"] == reason)
        out.print(f"[bold]{reason}[/] ({n}): {escape(fix)}", highlight=False)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def shown(text: str) -> Text:
    """A table cell of data (a name, a message): control characters escaped, no markup read."""
    return Text(printable(text))


def show_hits(out: Console, hits: list[dict[str, Any]], wide: bool = False) -> None:
    """One line per hit that fits the console: source and text cut with an ellipsis, the
    where and modality columns only where there is room (``--wide``: everything, wrapped;
    ``--json``: every column in full)."""
    source_w, where_w, modality_w = 28, 18, 8
    width = out.width
    columns = ["#", "score", "source"]
    used = 1 + (2 + 3) + (5 + 3) + (source_w + 3)
    for name, w in (("where", where_w), ("modality", modality_w)):
        if wide or width - used - (w + 3) >= 30 + 3:  # the text keeps 30 columns at least
            columns.append(name)
            used += w + 3
    columns.append("text")
    text_w = max(10, width - used - 3)
    table = Table(show_lines=wide)
    for col in columns:
        table.add_column(col, no_wrap=not wide, overflow="fold")
    for rank, hit in enumerate(hits, 1):
        cells = {"#": str(rank), "score": f"{hit['score']:.3f}",
                 "source": printable(hit["key"] or hit["uri"]), "where": hit["where"],
                 "modality": hit["modality"],
                 "text": printable((hit["text"] or "").replace("\n", " "))}
        if not wide:
            cells.update(source=_cut(cells["source"], source_w),
                         where=_cut(cells["where"], where_w), text=_cut(cells["text"], text_w))
        else:
            cells["text"] = cells["text"][:400]
        table.add_row(*(Text(cells[c]) for c in columns))
    _print_wide(out, table, wide)


def _print_wide(out: Console, table: Table, wide: bool) -> None:
    """``--wide`` tables at their natural width, however wide the console."""
    if not wide:
        out.print(table)
        return
    Console(file=out.file, width=max(natural_width(out, table), out.width), force_terminal=out.is_terminal,
            no_color=out.no_color).print(table)


def show_check(out: Console, job: JobConfig, findings: list[Finding]) -> None:
    """``embedpipe check``: one line per finding, a mark before it."""
    embed = job.embed
    where = getattr(embed, "base_url", "the emulator")
    out.print(f"[bold]check of job {escape(job.name)}[/]: {escape(embed.model)} at "
              f"{escape(where)}", highlight=False)
    for f in findings:
        mark = "[green]ok  [/]" if f.ok else "[red]FAIL[/]"
        out.print(f"{mark} {f.what:<10} {escape(printable(f.detail))}", highlight=False,
                  soft_wrap=True)
