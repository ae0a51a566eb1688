"""Upkeep of a job's own state tables (manifest, runs, Batch API jobs, rejects), whatever
``run.compact`` says of the vectors table: the user's readers never read these, embedpipe does,
every night.

Each flush appends a fragment to the manifest (a 10M-file backfill leaves ~5,000 of them, and
every nightly diff then opens them all), and each change of a Batch API job's state rewrites its
row with all its item ids (a 1M-text backfill leaves ~38 MB of old copies in the batch log per
300,000 items), kept as an old version's files forever. So once a table holds
:data:`SMALL_FRAGMENTS` small fragments or :data:`VERSIONS` versions, its files are compacted and
its versions older than :data:`KEEP` (or ``run.keep_days``, if shorter) removed. Nobody reads an
old version of these tables on purpose (runs, resumes and commands read the newest); a reader
that opened one just before, such as ``embedpipe status`` while a run ends, keeps it: it is
younger than that. Looking costs a few ms a table; doing, 0.5 s for a 300,000-row manifest in
150 fragments, 0.8 s for 1,000,000 rows in 500. Blocking.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pipeline.errors import SinkError

# Fragments of fewer rows than Lance's compaction target; a run adds one per flush.
SMALL_FRAGMENTS = 32
# Each commit is a version (a flush, a Batch API job's change of state).
VERSIONS = 64
KEEP = timedelta(hours=1)


def small_fragments(table: Any) -> int:
    return int(table.stats()["fragment_stats"]["num_small_fragments"])


def compact_state(tables: dict[str, Any], keep_days: float) -> list[str]:
    """Compact each of ``tables`` (name -> lancedb table) that has :data:`SMALL_FRAGMENTS`
    small fragments or :data:`VERSIONS` versions, and remove its versions older than
    :data:`KEEP` or ``keep_days``, whichever is shorter; what was done, one line per table. A
    table that fails raises :class:`SinkError` after the others are done."""
    done, failed = [], []
    keep = min(KEEP, timedelta(days=keep_days))
    for name, table in tables.items():
        try:
            fragments = small_fragments(table)
            if fragments < SMALL_FRAGMENTS and len(table.list_versions()) < VERSIONS:
                continue
            table.optimize(cleanup_older_than=keep)
            after = table.stats()["fragment_stats"]["num_fragments"]
            done.append(f"{name}: {fragments} small fragments compacted into {after}, "
                        f"{len(table.list_versions())} versions kept")
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            failed.append(f"{name}: {exc}")
    if failed:
        raise SinkError(f"state table upkeep failed ({'; '.join(failed)})"
                        + (f"; done: {'; '.join(done)}" if done else ""))
    return done
