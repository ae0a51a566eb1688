"""``embedpipe init SOURCE``: write a commented job file for a folder or a bucket
(:mod:`pipeline.commands.scaffold`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands.common import consoles

NAME = "init"
HELP = "write a commented job file for a folder or a bucket"
EXAMPLE = "embedpipe init ~/archive/scans --name scans --out jobs/scans.yaml"


def arguments(init: argparse.ArgumentParser) -> None:
    init.add_argument("source", help="a folder, s3://bucket/prefix (credentials from the AWS_* "
                                     "environment, AWS_ENDPOINT_URL for other stores) or "
                                     "az://container/prefix (from the AZURE_STORAGE_* "
                                     "environment)")
    init.add_argument("--name", default=None, help="the job's name (default: the folder's)")
    init.add_argument("--out", default=None, metavar="PATH",
                      help="where to write it (default: NAME.yaml here)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")


def main(args: argparse.Namespace) -> int:
    from pipeline.commands.scaffold import write_job_file

    path, found = write_job_file(args.source, Path(args.out) if args.out else None, args.name,
                                 args.force)
    consoles.err.print(f"wrote {path}: {found}", highlight=False, soft_wrap=True)
    consoles.err.print(f"next: embedpipe plan {path}   (then: embedpipe run {path})",
                       highlight=False)
    return 0
