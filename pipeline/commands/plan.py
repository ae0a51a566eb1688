"""``embedpipe plan JOB``: what a run would do and cost, with no API call."""

from __future__ import annotations

import argparse
import signal
from typing import TYPE_CHECKING, Any

from pipeline.commands.common import JOB_HELP, answer, consoles, job_settings, load_job, overrides
from pipeline.terminal import plural

if TYPE_CHECKING:
    from rich.console import Console

    from pipeline.config import JobConfig

NAME = "plan"
HELP = "what a run would do and cost, without calling the API"
EXAMPLE = "embedpipe plan jobs/nightly.yaml --json"


def arguments(plan: argparse.ArgumentParser) -> None:
    plan.add_argument("job", help=JOB_HELP)
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.add_argument("--retry-rejects", action="store_true",
                      help="plan as `run --retry-rejects` would run")
    job_settings(plan, "plan with a job key overridden, as `run --set` would (repeatable)")
    plan.add_argument("--allow-mass-delete", action="store_true",
                      help="plan as `run --allow-mass-delete` would run")


def main(args: argparse.Namespace) -> int:
    from pipeline.commands.planner import make_plan

    job = load_job(args.job, overrides=overrides(args))
    # SIGTERM ends a plan as Ctrl-C does: its worker processes are ended on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    figures = make_plan(job, retry_rejects=args.retry_rejects,
                        allow_mass_delete=args.allow_mass_delete).as_dict(job)
    return answer(args, figures, lambda: show_plan(consoles.out, job, figures))


def show_plan(out: Console, job: JobConfig, figures: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from pipeline.commands.tables import counts

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
              f"{counts(figures['rejects']) or 'none'}; Batch API cost "
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

