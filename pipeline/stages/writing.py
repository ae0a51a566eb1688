"""The writing stage: vectors and rejects into the sink, then the manifest rows of the files
they complete, then (once, at the end) the deletions.

The order is what makes a run killed at any moment safe to run again: a file's manifest row is
written only after all its rows are committed, so a file is either done (skipped next time) or
not (redone, and merging on ``id`` keeps its rows single). A changed file's new rows are held
until the file is complete and go in one commit with the removal of its stale rows (of its old
version, or parts a new split no longer has): at every table version a reader sees a file's old
rows or its new ones, never both. (The price: a run killed while such a file is in flight pays
again for the parts of it that were held. Into a table no reader uses yet, an upgrade's, nothing
is held.)

Deletions are guarded: more than ``run.max_delete_fraction`` of the files the job knew, or all
of them, is refused (:func:`pipeline.state.manifest.mass_delete_refusal`).

Blocking (Lance commits); in a plain loop::

    writer = Writer(sink, manifest, stats, fingerprint, run_id)
    for outcome in outcomes:
        writer.add(outcome)
    writer.flush()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.errors import RejectReason
from pipeline.records import Collected, Committed, FileEnd, Reject, SourceObject, Vector
from pipeline.sinks.arrow import ArrowSink
from pipeline.sinks.lance import LanceSink, reject_id
from pipeline.state.manifest import (
    EMBEDDED,
    REJECTED,
    UNREADABLE,
    FileState,
    Manifest,
    mass_delete_refusal,
)
from pipeline.stats import RunStats

Outcome = Vector | Reject | FileState | FileEnd | Committed | Collected
DELETE_CHUNK = 10_000  # gone uris turned into Python strings at a time
MOVED_CHUNK = 500  # gone uris whose content is looked for at a time
HOLD_MAX = 20_000  # held rows of incomplete changed files beyond which they are written anyway


@dataclass(slots=True)
class _Pending:
    """A file whose items are on their way to the table."""

    obj: SourceObject
    expected: int | None = None  # known once the validator is done with the file
    # The ids of its vector rows and of its rejects: kept while the file may replace earlier
    # rows (those not overwritten are deleted), dropped once its FileEnd says it does not (a
    # backfill's files wait for their Batch API results by the hundred thousand: two empty
    # sets are 432 bytes a file).
    ids: set[str] | None = field(default_factory=set)
    reject_ids: set[str] | None = field(default_factory=set)
    embedded: int = 0
    rejected: int = 0
    reason: str | None = None
    replaces: bool = False


class Writer:
    """Buffers outcomes, tracks which files are complete, and commits them in order."""

    def __init__(self, sink: LanceSink | ArrowSink, manifest: Manifest, stats: RunStats,
                 fingerprint: str, run_id: str, *, max_delete_fraction: float = 0.2,
                 allow_mass_delete: bool = False, hold_changed: bool = True,
                 on_collected: Callable[[list[str]], None] | None = None) -> None:
        self.sink = sink
        self.hold_changed = hold_changed
        # Batch API jobs all of whose rows came: recorded collected after the commit of them
        self.on_collected = on_collected
        self.collected: list[str] = []
        self.max_delete_fraction = max_delete_fraction
        self.allow_mass_delete = allow_mass_delete
        self.manifest = manifest
        self.stats = stats
        self.fingerprint = fingerprint
        self.run_id = run_id
        self.pending: dict[tuple[str, str], _Pending] = {}
        self.vectors: list[Vector] = []
        self.rejects: list[Reject] = []
        self.completed: list[FileState] = []
        self.replaced: dict[str, tuple[set[str], set[str]]] = {}
        self.flushed_keys: list[str] = []  # content keys of embedded rows committed

    @property
    def rows(self) -> int:
        """Rows waiting for the next flush: the table's or the manifest's, whichever are more
        (``flush_rows`` rows of a table per commit, not half as many, when each file is one
        row)."""
        return max(len(self.vectors) + len(self.rejects), len(self.completed) + len(self.collected))

    def add(self, entry: Outcome) -> None:
        # the most frequent first: this runs for every row and every file
        if isinstance(entry, Vector):
            self.vectors.append(entry)
            stats, item = self.stats, entry.item
            if entry.reused:
                stats.items_reused += 1
                stats.tokens_reused_by_modality[str(item.modality)] += entry.tokens
            else:
                stats.items_embedded += 1
                stats.tokens += entry.tokens
                stats.tokens_by_modality[str(item.modality)] += entry.tokens
            p = self._pending(item.source)
            p.embedded += 1
            if p.ids is not None:
                p.ids.add(item.id)
        elif isinstance(entry, FileEnd):
            p = self._pending(entry.source)
            p.expected = entry.count
            p.replaces |= entry.replaces
            if not p.replaces:
                p.ids = p.reject_ids = None
        elif isinstance(entry, FileState):
            self.completed.append(entry)  # touched, not changed: its row is all there is
            return
        elif isinstance(entry, Collected):
            self.collected.append(entry.display_name)
            return
        elif isinstance(entry, Committed):
            self.stats.items_resumed += 1
            p = self._pending(entry.item.source)
            p.embedded += 1
            if p.ids is not None:
                p.ids.add(entry.item.id)
        else:
            self.rejects.append(entry)
            self.stats.rejects += 1
            self.stats.reject_reasons[entry.reason] += 1
            p = self._pending(entry.source)
            p.rejected += 1
            if p.reject_ids is not None:
                p.reject_ids.add(reject_id(entry.source.uri, entry.version, entry.part))
            p.reason = p.reason or entry.reason
            # A reject removes the file's old rows, unless the file could not be read:
            # nothing is known of its content then (it is tried again next run).
            p.replaces |= entry.replaces and entry.reason != RejectReason.UNREADABLE
            if entry.part is None:
                p.expected = 1
        if p.expected is not None and p.embedded + p.rejected >= p.expected:
            self._complete(p)

    def _pending(self, obj: SourceObject) -> _Pending:
        key = (obj.uri, obj.version or "")
        p = self.pending.get(key)
        if p is None:
            p = self.pending[key] = _Pending(obj if obj.version is not None
                                             else obj.with_version(""))
        return p

    def _complete(self, p: _Pending) -> None:
        """``p`` has all its rows: its manifest row is due."""
        del self.pending[(p.obj.uri, p.obj.version or "")]
        if p.replaces:
            # a file that replaces rows keeps its ids (a FileEnd saying so, or none yet)
            assert p.ids is not None and p.reject_ids is not None
            self.replaced[p.obj.uri] = (p.ids, p.reject_ids)
        status = (EMBEDDED if p.embedded else
                  UNREADABLE if p.reason == RejectReason.UNREADABLE else REJECTED)
        self.completed.append(FileState(
            p.obj.uri, p.obj.key, p.obj.version or "", p.obj.size, p.obj.mtime,
            self.fingerprint, status, p.embedded, p.rejected, p.reason, p.obj.companions))
        self.stats.files_done += 1

    def flush(self) -> None:
        """Commit the buffered rows, then the manifest rows of the files they complete. Rows
        of a changed file not complete yet stay buffered (see the module's docstring)."""
        ready, held = self.vectors, list[Vector]()
        if self.hold_changed and self.pending and len(self.vectors) < HOLD_MAX:
            ready, held = [], []
            for v in self.vectors:
                (held if self._held(v.item.source) else ready).append(v)
        if ready or self.rejects or self.completed:
            self.sink.write(ready, self.rejects, self.run_id, self.replaced)
            self.manifest.record(self.completed, self.run_id)
            self.flushed_keys += [v.key for v in ready if v.key is not None and not v.reused]
            self.vectors, self.rejects, self.completed, self.replaced = held, [], [], {}
        if self.collected and not self.vectors and self.on_collected is not None:
            # every row sent before the jobs' markers is committed (none is held)
            names, self.collected = self.collected, []
            self.on_collected(names)

    def take_flushed_keys(self) -> list[str]:
        """The content keys of the embedded rows committed since the last call."""
        keys, self.flushed_keys = self.flushed_keys, []
        return keys

    def _held(self, obj: SourceObject) -> bool:
        """Whether a row of ``obj`` waits for the rest of its file: the file is incomplete and
        replaces earlier rows (or its FileEnd has not said yet whether it does)."""
        p = self.pending.get((obj.uri, obj.version or ""))
        return p is not None and (p.expected is None or p.replaces)

    def delete(self, gone: pa.Array | list[str], known: int, listed: int) -> str | None:
        """Delete the rows of the files gone from the source (of the ``known`` the job had;
        the source listed ``listed``), unless they are too many: then delete nothing and
        return why. A gone file whose every row's content this run wrote under another uri
        was moved, not lost: it does not count toward the guard."""
        moved = self._moved(gone)
        refusal = mass_delete_refusal(len(gone) - moved, known, listed,
                                      self.max_delete_fraction, self.allow_mass_delete)
        if refusal is not None:
            return refusal
        self.stats.files_moved = moved
        for start in range(0, len(gone), DELETE_CHUNK):
            uris = gone[start : start + DELETE_CHUNK]
            uris = uris.to_pylist() if isinstance(uris, pa.Array) else uris
            self.sink.delete_uris(uris)
            self.manifest.forget(uris)
            self.stats.files_deleted += len(uris)
        return None

    def _moved(self, gone: pa.Array | list[str]) -> int:
        moved = 0
        for start in range(0, len(gone), MOVED_CHUNK):
            uris = gone[start : start + MOVED_CHUNK]
            uris = uris.to_pylist() if isinstance(uris, pa.Array) else list(uris)
            moved += len(self.sink.rehomed(uris, self.run_id))
        return moved
