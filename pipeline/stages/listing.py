"""The listing stage: the source's listing and the manifest, merged as two sorted streams.

The connector lists in ``uri`` order, in Arrow batches; the manifest comes sorted the same way
(:meth:`pipeline.state.manifest.Manifest.sorted_rows`). Each listing batch is matched, column by
column, against the manifest rows up to its last uri (the window): a listed object is new (no
row), unchanged (the listing alone proves it: neither read nor sent), or to be done (changed, or
an unreadable file tried again). Manifest rows of the window the listing did not have are gone:
the deletions come out of the same pass, and memory holds one batch and one window, whatever
the number of files. Only the files to be done become Python objects.

A listing that is not in order is still diffed right: a batch is sorted on arrival, and an entry
that comes after the merge has passed its place is looked up among the rows held as gone so far
(which then grow with the disorder; the stage logs that the source lists out of order).

Entries the connector could not use (not regular files, broken links) come out as listing
rejects. Blocking (the connector lists over the network or the disk; the manifest is sorted on
disk); the engine calls it from a worker thread::

    listing = Listing(connector, companions, manifest_rows, known, fingerprint, stats)
    while (chunk := listing.next_chunk()) is not None:
        todo, rejects = listing.diff(chunk)
    listing.gone()  # the uris to delete, once next_chunk() returned None
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import EPOCH, LISTING_SCHEMA, Connector, listed_objects, pylists
from pipeline.errors import SinkError
from pipeline.records import Reject, SourceObject, record
from pipeline.stages.companions import Companions
from pipeline.state.manifest import DIFF_SCHEMA, REJECTED, UNREADABLE, FileState, states_of
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.listing")

# The listing's columns plus what the companions stage notes of each object.
CHUNK_SCHEMA = LISTING_SCHEMA.append(pa.field("sidecar", pa.string())).append(
    pa.field("companions", pa.string()))
MTIME_TOLERANCE_US = 10  # a local file's mtime is its modification time to the microsecond


@record
class Todo:
    """A listed file that must be read and validated, with its manifest row if it had one."""

    obj: SourceObject
    prev: FileState | None


class Listing:
    def __init__(self, connector: Connector, companions: Companions,
                 manifest_rows: Iterator[pa.RecordBatch] | None, known: int, fingerprint: str,
                 stats: RunStats, *, retry_rejects: bool = False) -> None:
        self.connector = connector
        self.companions = companions
        self.known = known  # files the job knew before this run
        self.fingerprint = fingerprint
        self.stats = stats
        self.retry_rejects = retry_rejects
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._manifest = self._in_order(manifest_rows if manifest_rows is not None else iter(()))
        self._held = _empty_manifest()  # manifest rows read ahead of the listing
        self._manifest_last: str | None = None
        self._last: str | None = None  # the listing's greatest uri merged so far
        self._gone: list[pa.Table] = []  # manifest rows the listing has passed without
        self._out_of_order = False
        self.done = False

    def next_chunk(self) -> pa.Table | None:
        """The next batch of the listing (None at its end, when the gone files are known)."""
        if self._batches is None:
            self._batches = self.connector.list_batches()
        for batch in self._batches:
            if batch.num_rows:
                return pa.Table.from_batches([batch])
        if not self.done:  # what the manifest has beyond the listing's last uri is gone too
            self.stats.links_skipped = int(getattr(self.connector, "skipped", 0))
            self._gone.append(self._held)
            self._gone.extend(_diff_rows(b) for b in self._manifest)
            self._held = _empty_manifest()
            self.done = True
        return None

    def diff(self, chunk: pa.Table) -> tuple[list[Todo], list[Reject]]:
        """What of ``chunk`` must be done, and the listing's rejects; counts every file."""
        stats = self.stats
        stats.files_seen += chunk.num_rows
        chunk = self._attach(chunk)
        uris = chunk.column("uri")
        if not _ascending(uris):
            self._disorder("a batch")
            chunk = chunk.sort_by("uri")
        late = None
        if self._last is not None and chunk.num_rows:
            early = pc.less_equal(chunk.column("uri"), self._last)
            if pc.any(early).as_py():
                self._disorder("an entry after its place")
                late, chunk = chunk.filter(early), chunk.filter(pc.invert(early))
        prev = self._match(chunk)
        if late is not None:
            chunk = pa.concat_tables([chunk, late])
            prev = pa.concat_tables([prev, self._match_late(late)])
        return self._sort(chunk, prev)

    def gone(self) -> pa.Array:
        """The uris the manifest had that the listing did not find (once it is done), but for
        those under a folder the connector could not list: not seen is not gone."""
        gone = pa.concat_arrays([t.column("uri").combine_chunks() for t in self._gone]
                                or [pa.array([], pa.string())])
        unlisted: list[str] = list(getattr(self.connector, "unlisted", ()))
        if unlisted and len(gone):
            hidden = pc.starts_with(gone, unlisted[0])
            for prefix in unlisted[1:]:
                hidden = pc.or_(hidden, pc.starts_with(gone, prefix))
            kept = pc.sum(hidden).as_py() or 0
            if kept:
                log.warning("%d files under %d folders that could not be listed are kept (not "
                            "seen is not gone)", kept, len(unlisted))
            gone = gone.filter(pc.invert(hidden))
        return gone

    # --- merging -------------------------------------------------------------------------------

    def _match(self, chunk: pa.Table) -> pa.Table:
        """The manifest row of each entry of the (sorted, not late) chunk, or a null row."""
        if not chunk.num_rows:
            return _empty_manifest()
        self._last = chunk.column("uri")[-1].as_py()
        window = self._through(self._last)
        listed = chunk.column("uri").combine_chunks()
        found = pc.is_in(window.column("uri"), value_set=listed)
        if not pc.all(found).as_py():
            self._gone.append(window.filter(pc.invert(found)))
        return window.take(pc.index_in(listed, value_set=window.column("uri").combine_chunks()))

    def _match_late(self, late: pa.Table) -> pa.Table:
        """Late entries' rows are among those held as gone: take them back from there."""
        held = pa.concat_tables(self._gone) if self._gone else _empty_manifest()
        idx = pc.index_in(late.column("uri"), value_set=held.column("uri").combine_chunks())
        taken = pc.is_in(held.column("uri"), value_set=late.column("uri").combine_chunks())
        self._gone = [held.filter(pc.invert(taken))]
        return held.take(idx)

    def _through(self, last: str) -> pa.Table:
        """The manifest rows up to ``last`` (inclusive), read ahead as far as needed."""
        held = self._held
        while self._manifest_last is None or self._manifest_last <= last:
            batch = next(self._manifest, None)
            if batch is None:
                break
            held = pa.concat_tables([held, _diff_rows(batch)])
        upto = pc.less_equal(held.column("uri"), last)
        self._held = held.filter(pc.invert(upto))
        return held.filter(upto)

    def _in_order(self, rows: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """The manifest's batches, checked to come in order (the merge relies on it)."""
        for batch in rows:
            if not batch.num_rows:
                continue
            uris = batch.column("uri")
            first = uris[0].as_py()
            if (self._manifest_last is not None and first <= self._manifest_last) or (
                    not _ascending(uris)):
                raise SinkError("the manifest did not come sorted by uri; nothing was changed")
            self._manifest_last = uris[-1].as_py()
            yield batch

    def _disorder(self, what: str) -> None:
        if not self._out_of_order:
            log.info("the source lists %s out of uri order: the diff sorts it and holds the "
                     "rows it passed in memory", what)
            self._out_of_order = True

    # --- sorting into todo, unchanged and rejects ----------------------------------------------

    def _sort(self, chunk: pa.Table, prev: pa.Table) -> tuple[list[Todo], list[Reject]]:
        stats = self.stats
        matched = pc.is_valid(prev.column("uri"))
        rejected = pc.is_valid(chunk.column("reject_reason"))
        status = prev.column("status")
        same = pc.fill_null(pc.and_(pc.not_equal(status, UNREADABLE),
                                    pc.equal(prev.column("fingerprint"), self.fingerprint)), False)
        same = pc.and_(same, _equal_or_both_null(chunk.column("companions"),
                                                 prev.column("companions")))
        version = chunk.column("version")
        by_version = pc.equal(version, prev.column("version"))
        by_stat = pc.and_(
            pc.equal(chunk.column("size"), prev.column("size")),
            pc.less(pc.abs(pc.subtract(chunk.column("mtime").cast(pa.int64()),
                                       prev.column("mtime").cast(pa.int64()))),
                    MTIME_TOLERANCE_US))
        same = pc.and_(same, pc.fill_null(pc.if_else(pc.is_valid(version), by_version, by_stat),
                                          False))
        if self.retry_rejects:
            same = pc.and_(same, pc.invert(pc.fill_null(pc.equal(status, REJECTED), False)))
        unchanged = pc.and_(pc.and_(matched, same), pc.invert(rejected))
        todo_mask = pc.invert(pc.or_(unchanged, rejected))
        n_unchanged = pc.sum(unchanged).as_py() or 0
        n_rejected = pc.sum(rejected).as_py() or 0
        n_changed = pc.sum(pc.and_(todo_mask, matched)).as_py() or 0
        stats.files_unchanged += n_unchanged
        stats.files_rejected_at_listing += n_rejected
        stats.files_changed += n_changed
        stats.files_new += chunk.num_rows - n_unchanged - n_rejected - n_changed
        # FileStates only for the changed files: a first run's new files have none to build.
        states = states_of(prev.filter(pc.and_(todo_mask, matched)))
        todo = [Todo(obj, next(states) if had else None) for obj, had in zip(
            _objects(chunk.filter(todo_mask)), matched.filter(todo_mask).to_pylist(), strict=True)]
        rejects: list[Reject] = []
        if n_rejected:
            for entry, had in zip(listed_objects(chunk.filter(rejected)),
                                  matched.filter(rejected).to_pylist(), strict=True):
                assert isinstance(entry, Reject)
                rejects.append(entry if not had else Reject(
                    entry.source, entry.version, entry.reason, entry.message, replaces=True))
        return todo, rejects

    def _attach(self, chunk: pa.Table) -> pa.Table:
        """The chunk with each object's sidecar and companions noted, sidecars held back."""
        n = chunk.num_rows
        if not self.companions.active:
            return chunk.append_column("sidecar", pa.nulls(n, pa.string())).append_column(
                "companions", pa.nulls(n, pa.string()))
        keep: list[bool] = []
        sidecars: list[str | None] = []
        companions: list[str | None] = []
        for entry in listed_objects(chunk):
            if isinstance(entry, Reject):
                keep.append(True)
                sidecars.append(None)
                companions.append(None)
                continue
            attached = self.companions.attach(entry)
            keep.append(attached is not None)
            if attached is None:
                self.stats.files_sidecars += 1
            sidecars.append(attached.sidecar if attached else None)
            companions.append(attached.companions if attached else None)
        chunk = chunk.append_column("sidecar", pa.array(sidecars, pa.string())).append_column(
            "companions", pa.array(companions, pa.string()))
        return chunk.filter(pa.array(keep))


def _ascending(uris: pa.ChunkedArray | pa.Array) -> bool:
    """Each uri greater than the one before it."""
    return len(uris) < 2 or bool(pc.all(pc.less(uris[:-1], uris[1:])).as_py())


def _equal_or_both_null(a: pa.ChunkedArray | pa.Array, b: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pc.or_(pc.fill_null(pc.equal(a, b), False), pc.and_(pc.is_null(a), pc.is_null(b)))


def _objects(rows: pa.Table) -> Iterator[SourceObject]:
    """The rows to do (none a reject) as records, with their sidecars and companions: built
    once from the columns (this runs for every file to do)."""
    columns = pylists(rows, ("uri", "key", "version", "size", "mtime", "sidecar", "companions"))
    for uri, key, version, size, mtime, sidecar, companions in zip(*columns, strict=True):
        yield SourceObject(uri, key, size or 0, mtime or EPOCH, version, sidecar, companions)


def _empty_manifest() -> pa.Table:
    return DIFF_SCHEMA.empty_table()


def _diff_rows(batch: pa.RecordBatch) -> pa.Table:
    """A batch of the sorted manifest in the diff's own types (whatever the sort returned)."""
    return pa.Table.from_batches([batch]).cast(DIFF_SCHEMA)
