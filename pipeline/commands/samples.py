"""``embedpipe samples FOLDER``: write generated sample files (texts, images, a PDF) made by
code (:mod:`pipeline.commands.sample_files`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands.common import consoles, notice, positive
from pipeline.outcome import EXIT_USAGE

NAME = "samples"
HELP = "write generated sample files (texts, images, a PDF)"
EXAMPLE = "embedpipe samples jobs/samples/quickstart/generated"


def arguments(samples: argparse.ArgumentParser) -> None:
    samples.add_argument("folder", help="where to write them (made if missing)")
    samples.add_argument("--texts", type=positive, default=None, metavar="N",
                         help="write N small text files instead of the images and PDF")


def main(args: argparse.Namespace) -> int:
    from pipeline.commands.sample_files import make_quickstart_media, make_text_corpus

    folder = Path(args.folder)
    try:
        made = (make_text_corpus(folder, args.texts) if args.texts is not None
                else make_quickstart_media(folder))
    except OSError as exc:
        notice("error", f"cannot write samples under {folder}: {exc.strerror or exc}")
        return EXIT_USAGE
    consoles.err.print(f"wrote {len(made)} files under {folder}")
    return 0
