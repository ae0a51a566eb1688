"""``embedpipe schema``: the job file's JSON Schema (for editors with the YAML language server:
``# yaml-language-server: $schema=...``), or the job and CLI references as Markdown, all
generated from the code (:mod:`pipeline.config.reference`)."""

from __future__ import annotations

import argparse

NAME = "schema"
HELP = "print the job file's JSON Schema (or the job or CLI reference as Markdown)"
EXAMPLE = "embedpipe schema > job.schema.json"


def arguments(schema: argparse.ArgumentParser) -> None:
    schema.add_argument("--markdown", choices=("job", "cli"), default=None,
                        help="print the job-file reference (job) or the command reference (cli) "
                             "as Markdown instead: the pages under docs/")


def main(args: argparse.Namespace) -> int:
    if args.markdown == "cli":
        from pipeline.commands.reference import cli_reference

        print(cli_reference(), end="")
        return 0
    from pipeline.config.reference import job_reference, job_schema_text

    print(job_reference() if args.markdown == "job" else job_schema_text(), end="")
    return 0
