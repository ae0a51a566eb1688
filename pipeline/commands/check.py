"""``embedpipe check JOB``: a preflight of the job's endpoint with one tiny call."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from pipeline.commands.common import JOB_HELP, consoles, job_settings, load_job, overrides
from pipeline.outcome import EXIT_FAILED
from pipeline.terminal import printable

if TYPE_CHECKING:
    from rich.console import Console

    from pipeline.commands.preflight import Finding
    from pipeline.config import JobConfig

NAME = "check"
HELP = ("a preflight of the job's endpoint with one tiny call: key, auth style, model, "
        "dimensions, task input, Batch API, latency")
EXAMPLE = "embedpipe check jobs/nightly.yaml --json"


def arguments(check: argparse.ArgumentParser) -> None:
    check.add_argument("job", help=JOB_HELP)
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    job_settings(check, "check with a job key overridden, as `run --set` would (repeatable)")


def main(args: argparse.Namespace) -> int:
    import anyio

    from pipeline.commands.preflight import check_job, passed

    job = load_job(args.job, overrides=overrides(args))
    findings = anyio.run(check_job, job)
    code = 0 if passed(findings) else EXIT_FAILED
    if args.json:
        print(json.dumps({"ok": code == 0, "findings": [f.as_dict() for f in findings]}))
    else:
        show_check(consoles.out, job, findings)
    return code


def show_check(out: Console, job: JobConfig, findings: list[Finding]) -> None:
    """``embedpipe check``: one line per finding, a mark before it."""
    from rich.markup import escape

    embed = job.embed
    where = getattr(embed, "base_url", "the emulator")
    out.print(f"[bold]check of job {escape(job.name)}[/]: {escape(embed.model)} at "
              f"{escape(where)}", highlight=False)
    for f in findings:
        mark = "[green]ok  [/]" if f.ok else "[red]FAIL[/]"
        out.print(f"{mark} {f.what:<10} {escape(printable(f.detail))}", highlight=False,
                  soft_wrap=True)

