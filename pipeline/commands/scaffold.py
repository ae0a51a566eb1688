"""The ``init`` command's work: a commented job file for a folder or a bucket, with the
modalities a quick listing finds, that ``load_job`` accepts as written."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, PipelineError
from pipeline.records import SourceObject
from pipeline.terminal import plural

LIST_FILES = 10_000  # a quick listing: this many files at most ...
LIST_SECONDS = 10.0  # ... or this long
MODALITIES = ("text", "pdf", "image", "audio", "video", "other")


def modality_of(key: str) -> str:
    from pipeline.validate.sniff import TEXT_MIMES, extension_mime

    mime = extension_mime(key) or ""
    if mime == "application/pdf":
        return "pdf"
    for prefix in ("image", "audio", "video"):
        if mime.startswith(prefix + "/"):
            return prefix
    return "text" if mime in TEXT_MIMES else "other"


def source_block(source: str) -> dict[str, Any]:
    block: dict[str, Any]
    """The job's ``source`` section for a folder, an ``s3://bucket/prefix`` or an
    ``az://container/prefix`` address."""
    if source.startswith("az://"):
        container, _, prefix = source.removeprefix("az://").partition("/")
        block = {"kind": "azure", "container": container, "prefix": prefix}
        if os.environ.get("AZURE_STORAGE_ENDPOINT"):
            block["endpoint_url"] = os.environ["AZURE_STORAGE_ENDPOINT"]
        return block
    if source.startswith("s3://"):
        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        block = {"kind": "s3", "bucket": bucket, "prefix": prefix}
        if os.environ.get("AWS_ENDPOINT_URL"):
            block["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        return block
    root = Path(source).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{source}: not a folder (or an s3://bucket/prefix or "
                          "az://container/prefix address)")
    return {"kind": "local", "root": str(root.resolve())}


def quick_listing(block: dict[str, Any]) -> tuple[Counter[str], bool, str | None]:
    """Files by modality in the first :data:`LIST_FILES` listed (or :data:`LIST_SECONDS`),
    whether the listing was cut short, and why it failed (None if it did not)."""
    from connectors import connector_for
    from pipeline.config import JobConfig

    counts: Counter[str] = Counter()
    try:
        quick = ({**block, "max_retries": 1, "timeout_s": 5} if block["kind"] in ("s3", "azure")
                 else block)
        job = JobConfig.model_validate({
            "name": "init", "source": quick, "sink": {"kind": "lance", "uri": "unused"},
            "embed": {"provider": "emulator", "model": "gemini-embedding-2",
                      "output_dimensionality": 768}})
        started = time.monotonic()
        for entry in connector_for(job).list():
            if isinstance(entry, SourceObject):
                counts[modality_of(entry.key)] += 1
            if sum(counts.values()) >= LIST_FILES or time.monotonic() - started > LIST_SECONDS:
                return counts, True, None
    except (PipelineError, OSError, ValueError) as exc:
        return counts, False, str(exc).splitlines()[0][:200]
    return counts, False, None


def _address(block: dict[str, Any]) -> str:
    if block["kind"] == "azure":
        return f"az://{block['container']}/{block['prefix']}"
    if block["kind"] == "s3":
        return f"s3://{block['bucket']}/{block['prefix']}"
    return str(block["root"])


def job_name(source: str) -> str:
    if source.startswith(("s3://", "az://")):
        bucket, _, prefix = source.split("://", 1)[1].strip("/").partition("/")
        base = f"{bucket}-{prefix.rsplit('/', 1)[-1]}" if prefix else bucket
    else:
        base = source.rstrip("/").rsplit("/", 1)[-1] or "corpus"
    return re.sub(r"[^A-Za-z0-9_\-.]+", "-", base).strip("-.") or "corpus"


def listing_line(counts: Counter[str], cut: bool, failed: str | None) -> str:
    found = ", ".join(f"{counts[m]:,} {m}" for m in MODALITIES if counts[m])
    if failed:
        return f"The listing failed ({failed}): check the source's access before a run."
    if not counts:
        return "The listing found no files yet."
    more = " (the first ones: the listing was cut short)" if cut else ""
    return f"Found {plural(sum(counts.values()), 'file')}{more}: {found}."


def job_yaml(name: str, block: dict[str, Any], counts: Counter[str], cut: bool,
             failed: str | None) -> str:
    import yaml

    listing = "# " + listing_line(counts, cut, failed)
    multimodal = any(counts[m] for m in ("pdf", "image", "audio", "video"))
    other = (f"\n# {counts['other']:,} files of other types will be rejected as unsupported;"
             " exclude them to keep the rejects table short." if counts["other"] else "")
    source = yaml.safe_dump({"source": {**block, "include": ["**/*"], "exclude": []}},
                            sort_keys=False).rstrip()
    model_note = ("PDFs, images, audio and video need gemini-embedding-2 (multimodal)"
                  if multimodal else "text only: gemini-embedding-001 also works (text only)")
    return f"""\
# embedpipe job for {_address(block)}
# written by `embedpipe init`. Check it with `embedpipe plan {name}.yaml` (no API call, prices
# and quota-bound time), then `embedpipe run {name}.yaml`. Every key: `embedpipe schema --markdown job`.
{listing}{other}
name: "{name}"

# Where the files come from. include/exclude are glob patterns on the key (e.g. "**/*.pdf").
{source}

embed:
  provider: gemini
  api_key: ${{GEMINI_API_KEY}}        # from the environment; never written here
  # {model_note}
  model: gemini-embedding-2
  output_dimensionality: 768          # 128..3072; 768 / 1536 / 3072 recommended
  mode: auto                          # backfills over embed.batch_min_items go to the Batch API (half price)
  concurrency: 8
  # quota: {{rpm: 3000, tpm: 1000000}}  # your project's quotas, so a run never meets a 429

# Where the vectors go (a Lance table; kind: arrow writes Parquet files instead).
sink:
  kind: lance
  uri: ./out/{name}                   # beside this job file

run:
  max_delete_fraction: 0.2            # a night deleting more than this share deletes nothing
  # engine: ray                       # validation and calls on a Ray cluster
  # metrics_textfile: /var/lib/node_exporter/textfile/embedpipe-{name}.prom
"""


def write_job_file(source: str, out: Path | None, name: str | None, force: bool) -> tuple[Path, str]:
    """Write the job file; returns its path and what the listing found (one line)."""
    from pipeline.config import load_job

    name = name or job_name(source)
    target = out or Path(f"{name}.yaml")
    if target.exists() and not force:
        raise ConfigError(f"{target} exists: choose --out, or --force to overwrite it")
    block = source_block(source)
    counts, cut, failed = quick_listing(block)
    text = job_yaml(name, block, counts, cut, failed)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        load_job(tmp, env={**os.environ, "GEMINI_API_KEY": os.environ.get("GEMINI_API_KEY", "x")})
    except ConfigError:
        tmp.unlink()
        raise
    tmp.replace(target)
    return target, listing_line(counts, cut, failed)
