"""The run history as one self-contained HTML page (``embedpipe report JOB --html PATH``).

No script, no font, no image fetched: the charts are SVG drawn here and inlined, the style is in
the page, and its Content-Security-Policy forbids loading anything, so the page opens the same
from a laptop, a CI artefact store or a mail attachment. Every value from the tables (file
names, messages) is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any

from pipeline.commands.history import History
from pipeline.models import SOURCES
from pipeline.terminal import plural

# Okabe & Ito's palette: told apart by readers with any common colour-vision deficiency.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#8C6D31",
           "#000000")

WIDTH, HEIGHT = 560, 230
LEFT, RIGHT, TOP, BOTTOM = 66, 12, 12, 38
MAX_X_LABELS = 8


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]  # one per run; None: not recorded for that run
    colour: str


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def compact(value: float) -> str:
    """1234 -> 1.2k, 5600000 -> 5.6M; small values as they are."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def dollars(value: float) -> str:
    if value == 0:
        return "$0"
    return (f"${value:.6f}".rstrip("0") if value < 0.01 else f"${value:,.4f}" if value < 100
            else f"${value:,.0f}")


def seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:,.1f} s"


def nice_tick(top: float, ticks: int = 4, integer: bool = False) -> float:
    """The step between an axis' gridlines: the smallest 1, 2, 2.5 or 5 x 10^k that puts
    ``ticks`` of them at or above ``top`` (a whole number for counts)."""
    if top <= 0:
        return 1.0
    raw = top / ticks
    power = 10 ** math.floor(math.log10(raw))
    step = next(float(m * power) for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    return max(1.0, math.ceil(step)) if integer else step


def run_labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Each run's start as its chart label: month, day and minute, or the time to the second
    where runs started within the same minute."""
    for fmt in ("%m-%d %H:%M", "%H:%M:%S"):
        labels = [r["started"].strftime(fmt) if isinstance(r["started"], datetime)
                  else str(r["run_id"])[:8] for r in runs]
        if len(set(labels)) == len(labels):
            break
    return labels


def bar_chart(chart_id: str, title: str, labels: Sequence[str], series: Sequence[Series], *,
              stacked: bool = False, fmt: Callable[[float], str] = compact,
              integer: bool = True) -> str:
    """A figure with a bar chart (grouped, or ``stacked``) of one value per run and series,
    its legend, and a caption; a chart with nothing recorded says so."""
    n = len(labels)
    totals = [sum(s.values[i] or 0 for s in series) if stacked
              else max((s.values[i] or 0 for s in series), default=0) for i in range(n)]
    recorded = any(v is not None for s in series for v in s.values)
    tick = nice_tick(max(totals, default=0), integer=integer)
    top = tick * 4
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    band = plot_w / max(n, 1)

    def y(value: float) -> float:
        return TOP + plot_h - value / top * plot_h

    parts = [f'<svg class="chart" id="{_e(chart_id)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'role="img" aria-labelledby="{_e(chart_id)}-title" '
             f'xmlns="http://www.w3.org/2000/svg">',
             f'<title id="{_e(chart_id)}-title">{_e(title)}</title>']
    for k in range(5):  # gridlines and the y axis' labels
        value = tick * k
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" '
                     f'y2="{y(value):.1f}"/>')
        parts.append(f'<text class="ylabel" x="{LEFT - 6}" y="{y(value) + 4:.1f}">'
                     f'{_e(fmt(value))}</text>')
    every = max(1, math.ceil(n / MAX_X_LABELS))
    for i, label in enumerate(labels):
        if i % every == 0 or i == n - 1:
            parts.append(f'<text class="xlabel" x="{LEFT + band * (i + 0.5):.1f}" '
                         f'y="{HEIGHT - BOTTOM + 16}">{_e(label)}</text>')
    inner = band * 0.8
    width = inner if stacked else inner / max(len(series), 1)
    for i in range(n):
        base = 0.0
        for j, s in enumerate(series):
            bar = s.values[i]
            if bar is None or bar <= 0:
                continue
            x = LEFT + band * i + band * 0.1 + (0 if stacked else j * width)
            bottom = base if stacked else 0.0
            parts.append(
                f'<rect class="bar" data-series="{_e(s.name)}" x="{x:.1f}" '
                f'y="{y(bottom + bar):.1f}" width="{max(width - 1, 1):.1f}" '
                f'height="{max(y(bottom) - y(bottom + bar), 0.5):.1f}" fill="{s.colour}">'
                f'<title>{_e(labels[i])}: {_e(s.name)} {_e(fmt(bar))}</title></rect>')
            if stacked:
                base += bar
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(0):.1f}" '
                 f'y2="{y(0):.1f}"/>')
    if not recorded or not any(totals):
        parts.append(f'<text class="empty" x="{LEFT + plot_w / 2:.1f}" y="{TOP + plot_h / 2:.1f}">'
                     f'{"none in these runs" if recorded else "not recorded for these runs"}'
                     f'</text>')
    parts.append("</svg>")
    legend = "".join(f'<span><i style="background:{s.colour}"></i>{_e(s.name)}</span>'
                     for s in series)
    return (f'<figure><figcaption>{_e(title)}</figcaption>{"".join(parts)}'
            f'<div class="legend">{legend}</div></figure>')


def charts(history: History) -> list[str]:
    runs = history.runs
    labels = run_labels(runs)

    def col(name: str) -> list[float | None]:
        return [r.get(name) for r in runs]

    reasons = sorted({reason for r in runs for reason in (r["reject_reasons"] or {})})
    reject_series = [
        Series(reason, [None if r["reject_reasons"] is None else
                        r["reject_reasons"].get(reason, 0) for r in runs],
               PALETTE[i % len(PALETTE)])
        for i, reason in enumerate(reasons)] or [Series("rejects", col("rejects"), PALETTE[3])]
    return [
        bar_chart("items", "Items embedded and files done per run", labels,
                  [Series("items embedded", col("items_embedded"), PALETTE[0]),
                   Series("files done", col("files_done"), PALETTE[5])]),
        bar_chart("cost", "Cost per run (USD, list prices)", labels,
                  [Series("cost", col("cost_usd"), PALETTE[2])], fmt=dollars, integer=False),
        bar_chart("rejects", "Rejects by reason per run", labels, reject_series, stacked=True),
        bar_chart("latency", "API call latency per run (p50, p95)", labels,
                  [Series("p50", col("latency_p50_s"), PALETTE[0]),
                   Series("p95", col("latency_p95_s"), PALETTE[1])], fmt=seconds, integer=False),
        bar_chart("throttling", "HTTP 429 answers and retries per run", labels,
                  [Series("HTTP 429", col("http_429"), PALETTE[3]),
                   Series("retries", col("retries"), PALETTE[4])]),
        bar_chart("wall", "Wall time per run", labels,
                  [Series("wall time", col("wall_s"), PALETTE[6])], fmt=seconds, integer=False),
    ]


def _cell(value: Any, fmt: Callable[[Any], str] = str) -> str:
    return "&ndash;" if value is None else _e(fmt(value))


RUN_TABLE: list[tuple[str, str, Callable[[Any], str]]] = [
    ("run_id", "run", str), ("status", "status", str), ("exit_code", "exit", str),
    ("started", "started (UTC)", lambda v: f"{v:%Y-%m-%d %H:%M:%S}"),
    ("files_seen", "files listed", lambda v: f"{v:,}"),
    ("files_done", "files done", lambda v: f"{v:,}"),
    ("files_deleted", "deleted", lambda v: f"{v:,}"),
    ("items_embedded", "items", lambda v: f"{v:,}"), ("rejects", "rejects", lambda v: f"{v:,}"),
    ("tokens", "tokens", lambda v: f"{v:,}"), ("cost_usd", "cost", dollars),
    ("api_calls", "calls", lambda v: f"{v:,}"), ("latency_p50_s", "p50", seconds),
    ("latency_p95_s", "p95", seconds), ("http_429", "429s", lambda v: f"{v:,}"),
    ("retries", "retries", lambda v: f"{v:,}"), ("wall_s", "wall", seconds),
]


def runs_table(history: History) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for _, h, _ in RUN_TABLE)
    rows = "".join(
        f'<tr class="status-{_e(r["status"])}">'
        + "".join(f"<td>{_cell(r.get(c), f)}</td>" for c, _, f in RUN_TABLE) + "</tr>"
        for r in reversed(history.runs))
    return f'<table class="runs"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def rejects_table(history: History) -> str:
    if not history.rejects:
        return '<p class="none">No rejects: every file of the last runs was embedded.</p>'
    rows = []
    for r in history.rejects:
        name = r["key"] or r["uri"]
        part = "" if r["part"] is None else f" (part {r['part'] + 1})"
        rows.append(f'<tr><td class="file" title="{_e(r["uri"])}">{_e(name)}{_e(part)}</td>'
                    f'<td>{_e(r["reason"])}</td><td>{_cell(r["message"])}</td>'
                    f'<td>{_cell(r["fix"])}</td><td>{_cell(r["run_id"])}</td></tr>')
    more = (f'<p class="none">{len(history.rejects)} newest of {history.rejects_total:,}: '
            f'<code>embedpipe rejects JOB</code> lists them all.</p>'
            if history.rejects_total > len(history.rejects) else "")
    return ('<table class="rejects"><thead><tr><th>file</th><th>reason</th><th>message</th>'
            f'<th>what to do</th><th>run</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
            + more)


def summary(history: History) -> str:
    runs = history.runs
    last = runs[-1]
    cost = sum(r["cost_usd"] or 0 for r in runs)
    code = "-" if last["exit_code"] is None else last["exit_code"]
    cards = [("last run", f'{last["status"]} (exit {code})'),
             ("runs shown", f"{len(runs)}"),
             ("items embedded", f'{sum(r["items_embedded"] or 0 for r in runs):,}'),
             ("cost", dollars(cost)),
             ("rejects now", f"{history.rejects_total:,}")]
    return '<div class="cards">' + "".join(
        f'<div class="card"><span>{_e(k)}</span><b>{_e(v)}</b></div>'
        for k, v in cards) + "</div>"


STYLE = """
:root { color-scheme: light; --ink: #1d2433; --muted: #5b6475; --line: #d9dee7; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
header, main { max-width: 1200px; margin: 0 auto; padding: 16px 24px; }
header h1 { font-size: 22px; margin: 8px 0 4px; }
header p { margin: 0; color: var(--muted); }
h2 { font-size: 17px; margin: 28px 0 10px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card span { display: block; color: var(--muted); font-size: 12px; }
.card b { font-size: 18px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px;
         padding: 10px 12px; }
figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { width: 100%; height: auto; display: block; }
svg .grid { stroke: #eceff4; } svg .axis { stroke: #8a93a3; }
svg text { font-size: 11px; fill: var(--muted); }
svg .ylabel { text-anchor: end; } svg .xlabel { text-anchor: middle; }
svg .empty { text-anchor: middle; font-size: 13px; }
.legend { display: flex; flex-wrap: wrap; gap: 12px; font-size: 12px; color: var(--muted); }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 5px;
            border-radius: 2px; vertical-align: -1px; }
.scroll { overflow-x: auto; background: #fff; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 6px 9px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
table.runs td { white-space: nowrap; font-variant-numeric: tabular-nums; }
tr.status-failed td, tr.status-interrupted td { background: #fff3f0; }
tr.status-quota td, tr.status-stopped td, tr.status-running td { background: #fffbea; }
td.file { word-break: break-all; min-width: 14em; }
.none { color: var(--muted); }
footer { max-width: 1200px; margin: 0 auto; padding: 8px 24px 32px; color: var(--muted);
         font-size: 12px; }
"""


def _started(run: dict[str, Any]) -> str:
    return f"{run['started']:%Y-%m-%d %H:%M}" if isinstance(run["started"], datetime) else "?"


def render_html(history: History, generated: datetime) -> str:
    """The whole page, as text."""
    if not history.runs:
        raise ValueError("no run to show")
    sources = " · ".join(f"{_e(k)}: {_e(v)}" for k, v in SOURCES.items()
                         if k in ("prices", "quotas"))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>embedpipe: {_e(history.job)}, last {plural(len(history.runs), "run")}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>Run history of {_e(history.job)}</h1>
<p>model {_e(history.model)} · sink {_e(history.sink)} · {plural(len(history.runs), "run")} from
{_e(_started(history.runs[0]))} to {_e(_started(history.runs[-1]))} UTC ·
made {generated:%Y-%m-%d %H:%M} UTC</p>
</header>
<main>
{summary(history)}
<h2>Runs</h2>
<div class="charts">
{"".join(charts(history))}
</div>
<h2>Each run</h2>
<div class="scroll">{runs_table(history)}</div>
<h2>Latest rejects</h2>
<div class="scroll">{rejects_table(history)}</div>
</main>
<footer>Made by <code>embedpipe report</code> from the job's runs and rejects tables. Costs are
list prices at the time of each run, the Batch API's at half price; a dash is a figure the
version that ran did not record. {sources}</footer>
</body>
</html>
"""
