"""A run's figures in Prometheus' text format, for node_exporter's textfile collector
(``run.metrics_textfile: /var/lib/node_exporter/textfile/embedpipe-nightly.prom``).

Written at the end of every run, atomically (a temporary file beside it, then a rename), so the
collector never reads half a file. Every series carries the job's name; alert on
``embedpipe_last_run_success == 0`` or on ``time() - embedpipe_last_run_end_timestamp_seconds``.
"""

from __future__ import annotations

from typing import Any

# name, help, report key (None: computed below)
_GAUGES = [
    ("embedpipe_last_run_end_timestamp_seconds", "When the job's last run ended (Unix time).",
     "finished"),
    ("embedpipe_last_run_duration_seconds", "Wall time of the job's last run.", "wall_s"),
    ("embedpipe_last_run_exit_code", "Exit code of the job's last run (see embedpipe --help).",
     "exit_code"),
    ("embedpipe_last_run_items_embedded", "Items embedded by the job's last run.",
     "items_embedded"),
    ("embedpipe_last_run_items_reused", "Items the job's last run wrote with a stored vector "
     "of the same request (no call).", "items_reused"),
    ("embedpipe_last_run_cost_saved_usd", "What those items would have cost, USD.",
     "cost_saved_usd"),
    ("embedpipe_last_run_tokens", "Input tokens the job's last run was billed for.", "tokens"),
    ("embedpipe_last_run_cost_usd", "Estimated cost of the job's last run, USD.", "cost_usd"),
    ("embedpipe_last_run_api_calls", "Embedding API calls of the job's last run.", "api_calls"),
    ("embedpipe_last_run_http_429", "HTTP 429 answers the job's last run got.", "http_429"),
    ("embedpipe_last_run_retries", "Calls the job's last run retried.", "retries"),
]
_FILES = ("seen", "new", "changed", "unchanged", "deleted", "moved", "done")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> str:
    return "NaN" if value is None else repr(float(value))


def prometheus_text(report: dict[str, Any]) -> str:
    """The run report (:meth:`pipeline.run.Run.report`) as Prometheus text exposition."""
    job = f'job="{_label(str(report["job"]))}"'
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} gauge"])
        lines.extend(f"{name}{{{job}{labels}}} {_number(v)}" for labels, v in samples)

    gauge("embedpipe_last_run_success",
          "1 if the job's last run finished (exit 0, rejects included), else 0.",
          [("", 1 if report["exit_code"] == 0 else 0)])
    for name, help_text, key in _GAUGES:
        gauge(name, help_text, [("", report.get(key))])
    gauge("embedpipe_last_run_files", "Files of the job's last run, by what became of them.",
          [(f',kind="{kind}"', report.get(f"files_{kind}", 0)) for kind in _FILES])
    reasons = sorted((report.get("reject_reasons") or {}).items())
    gauge("embedpipe_last_run_rejects", "Items the job's last run rejected, by reason.",
          [(f',reason="{_label(r)}"', n) for r, n in reasons] or [(',reason="none"', 0)])
    gauge("embedpipe_last_run_call_latency_seconds",
          "Latency of the job's last run's successful calls (quantiles).",
          [(',quantile="0.5"', report.get("latency_p50_s")),
           (',quantile="0.95"', report.get("latency_p95_s"))])
    return "\n".join(lines) + "\n"
