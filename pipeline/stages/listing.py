"""The listing stage: the source's objects, diffed against the manifest.

A chunk of the connector's (sorted, lazy) listing at a time, each object is sorted into what
must be done (new, changed, or an unreadable file tried again) and what need not be (unchanged:
neither read nor sent). Entries the connector could not use (not regular files, broken links)
come out as listing rejects. When the listing is done, what the manifest knew and the listing
did not find is :meth:`Listing.gone`: the deletions, which the writing stage guards.

Blocking (the connector lists over the network or the disk); the engine calls it from a
worker thread and decides how chunks travel on::

    listing = Listing(connector, companions, previous, fingerprint, stats)
    while chunk := listing.next_chunk():
        todo, rejects = listing.diff(chunk)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice

from connectors.base import Connector
from pipeline.records import Reject, SourceObject
from pipeline.stages.companions import Companions
from pipeline.state.manifest import REJECTED, FileState
from pipeline.stats import RunStats

CHUNK_ENTRIES = 512


@dataclass(frozen=True, slots=True)
class Todo:
    """A listed file that must be read and validated, with its manifest row if it had one."""

    obj: SourceObject
    prev: FileState | None


class Listing:
    def __init__(self, connector: Connector, companions: Companions,
                 previous: dict[str, FileState], fingerprint: str, stats: RunStats, *,
                 retry_rejects: bool = False) -> None:
        self.connector = connector
        self.companions = companions
        self._previous = previous
        self.known = len(previous)  # files the job knew before this run
        self.fingerprint = fingerprint
        self.stats = stats
        self.retry_rejects = retry_rejects
        self._entries: Iterator[SourceObject | Reject] | None = None

    def next_chunk(self) -> list[SourceObject | Reject]:
        """The next entries of the listing ([] at its end). Blocking."""
        if self._entries is None:
            self._entries = self.connector.list()
        return list(islice(self._entries, CHUNK_ENTRIES))

    def diff(self, chunk: list[SourceObject | Reject]) -> tuple[list[Todo], list[Reject]]:
        """What of ``chunk`` must be done, and the listing's rejects; counts every file."""
        todo: list[Todo] = []
        rejects: list[Reject] = []
        stats = self.stats
        for entry in chunk:
            stats.files_seen += 1
            if isinstance(entry, Reject):
                prev = self._previous.pop(entry.source.uri, None)
                stats.files_rejected_at_listing += 1
                rejects.append(entry if prev is None else replace(entry, replaces=True))
                continue
            if self.companions.active:
                attached = self.companions.attach(entry)
                if attached is None:
                    stats.files_sidecars += 1
                    continue  # a sidecar: embedded with its media file
                entry = attached
            prev = self._previous.pop(entry.uri, None)
            if prev is not None and prev.unchanged(entry, self.fingerprint) and not (
                    self.retry_rejects and prev.status == REJECTED):
                stats.files_unchanged += 1
                continue
            if prev is None:
                stats.files_new += 1
            else:
                stats.files_changed += 1
            todo.append(Todo(entry, prev))
        return todo, rejects

    def gone(self) -> list[str]:
        """The uris the manifest had that the listing did not find (ask once it is done)."""
        return list(self._previous)
