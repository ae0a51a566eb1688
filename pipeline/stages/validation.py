"""The validation stage: read each file to do and fit it to the model (``pipeline/validate/``).

- :func:`groups` puts small files in groups (one hop to a worker validates many; a hop costs
  more than validating a small text) and large ones alone.
- :class:`FileWork` is one file's blocking work: read it, find its version (a file only touched
  ends as its manifest row, unchanged), then pull its items from the validator a chunk at a time
  (bounded memory for a 1,000-page PDF). :class:`GroupWork` runs a group's files in one go and
  can say which file it is on, so a caller that gives up waiting knows which file to blame.
- :meth:`Validation.sort` turns what the validator said into items (to embed) and outcomes (to
  write), closing each file with a :class:`FileEnd`; :meth:`Validation.timeout` is the reject a
  file gets when it outlives :attr:`Validation.limit_s`.

How the deadline is enforced is the engine's business (a thread given up on, a task killed):
this module only says what the limit is and what a file that passes it becomes. In a plain loop
:meth:`Validation.validate` does a whole file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from connectors.base import Connector, content_version
from connectors.blob import Blob
from pipeline.config import JobConfig
from pipeline.errors import ConnectorError, RejectReason, SourceUnavailable
from pipeline.records import Extras, FileEnd, Item, Reject, SourceObject
from pipeline.stages.budget import PayloadBudget
from pipeline.stages.companions import Companions
from pipeline.stages.listing import Todo
from pipeline.state.manifest import FileState
from pipeline.stats import RunStats
from pipeline.validate import Validator
from pipeline.validate.deadline import Deadline

log = logging.getLogger("embedpipe.validate")

# Files up to this size are validated in groups, one hop for the whole group.
SMALL_FILE_BYTES = 1_000_000
GROUP_FILES = 128
GROUP_BYTES = 4_000_000

Entry = Item | Reject | FileState
Outcome = Reject | FileState | FileEnd


def groups(todo: list[Todo]) -> Iterator[list[Todo]]:
    """Large files alone, the largest first; then small ones in groups of bounded count and
    size, in listing order. Largest first is the classic cure for a long tail
    (longest-processing-time-first): a 1,000-page PDF begun last would keep the run waiting on
    one worker while the others sit idle."""
    large = sorted((t for t in todo if t.obj.size > SMALL_FILE_BYTES), key=lambda t: -t.obj.size)
    for entry in large:
        yield [entry]
    group: list[Todo] = []
    size = 0
    for entry in todo:
        if entry.obj.size > SMALL_FILE_BYTES:
            continue
        group.append(entry)
        size += entry.obj.size
        if len(group) >= GROUP_FILES or size >= GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


@dataclass
class Sorted:
    """A chunk of a file's entries, sorted for the next stages."""

    items: list[Item] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)


class Validation:
    def __init__(self, job: JobConfig, connector: Connector, companions: Companions,
                 stats: RunStats, *, retry_rejects: bool = False) -> None:
        self.validator = Validator(job)
        self.connector = connector
        self.companions = companions
        self.fingerprint = job.fingerprint()
        self.stats = stats
        self.retry_rejects = retry_rejects
        self.timeout_s = job.validate_.file_timeout_s
        self.budget = PayloadBudget(job.run.payload_memory_mb * 2**20)

    @property
    def limit_s(self) -> float:
        """How long a file may take before it is given up on (the validator checks
        ``file_timeout_s`` itself between steps; this catches code that never returns)."""
        return self.timeout_s * 1.5 + 1.0

    def work(self, todo: Todo) -> FileWork:
        return FileWork(self, todo)

    def timeout(self, work: FileWork, part: int) -> Reject:
        return work.reject(RejectReason.TIMEOUT, f"validation took longer than "
                           f"{self.timeout_s:g} s (validate.file_timeout_s)", part)

    def sort(self, work: FileWork, chunk: list[Entry], done: bool, into: Sorted) -> None:
        """Sort a file's entries into items and outcomes; when the file is done, close it with
        its FileEnd (a whole-file reject or a touched file's row completes it by itself)."""
        finished = done
        for entry in chunk:
            if isinstance(entry, FileState):
                # Touched but not changed: same content, nothing to pay for.
                self.stats.files_changed -= 1
                self.stats.files_unchanged += 1
                into.outcomes.append(entry)
                finished = False
                break
            if isinstance(entry, Reject) and entry.part is None:
                # completes the file by itself, with its old rows if it had any
                into.outcomes.append(replace(entry, replaces=work.replaces))
                finished = False
                break
            work.count += 1
            if isinstance(entry, Item):
                into.items.append(entry)
                self.budget.count([entry])
                self.stats.items_validated += 1
            else:
                into.outcomes.append(entry)
        if finished:
            into.outcomes.append(FileEnd(work.obj, work.count, replaces=work.replaces))

    def read(self, obj: SourceObject, listed: str | None) -> tuple[Blob, str, Extras | None]:
        """A file's bytes (a blob the caller closes), its version (``listed``, the listing's,
        else its content hash; with its companions', when the job has any) and its companions'
        caption, title and columns. Raises ConnectorError."""
        data = self.connector.fetch(obj)
        try:
            version = listed or content_version(data)
            extras = None
            if self.companions.active:
                version, extras = self.companions.read(obj, version)
        except BaseException:
            data.close()
            raise
        return data, version, extras

    def refetched(self, items: list[Item]) -> Iterator[Item]:
        """Items whose payload was let go (auto mode's hold) or went into a Batch API job that
        did not give their vectors, read and cut again (blocking), one at a time: those whose
        file still holds the same version; the others (changed, gone, unreadable) are left to
        the next run. No time limit: each of these files went through validation within it."""
        by_file: dict[tuple[str, str], tuple[SourceObject, set[str]]] = {}
        for item in items:
            by_file.setdefault((item.source.uri, item.version), (item.source, set()))[1].add(
                item.id)
        for (_, version_then), (obj, ids) in by_file.items():
            # local files are versioned by their content (hashed again: changed since?), an
            # object store's by the listing's ETag
            try:
                data, version, extras = self.read(
                    obj, None if obj.uri.startswith("file://") else obj.version)
            except SourceUnavailable:
                raise  # the source's failure ends the run: it is no file's
            except ConnectorError:
                continue
            with data:
                if version != version_then:
                    continue
                try:
                    for entry in self.validator.fit(obj.with_version(version), data, extras,
                                                    Deadline.never()):
                        if isinstance(entry, Item) and entry.id in ids:
                            yield entry
                        del entry
                except SourceUnavailable:
                    raise
                except Exception:  # a parser bug: the next run meets it as a reject
                    log.exception("validator failed again on %s", obj.key)

    def validate(self, todo: Todo) -> Sorted:
        """A whole file, in this thread, with no deadline: for plain loops and tests."""
        work = self.work(todo)
        out = Sorted()
        done = False
        while not done:
            chunk, done = work.step()
            self.sort(work, chunk, done, out)
        return out


class FileWork:
    """One file's blocking work: read it, find its version, then pull its items from the
    validator a chunk at a time (few hops for small files, bounded memory for large ones)."""

    CHUNK_ITEMS = 32
    CHUNK_BYTES = 8_000_000

    def __init__(self, stage: Validation, todo: Todo) -> None:
        self.stage = stage
        self.obj = todo.obj
        self.prev = todo.prev
        self.replaces = todo.prev is not None  # its old rows go when it completes
        self.items: Iterator[Item | Reject] | None = None
        self.emitted = 0
        self.count = 0  # items and part rejects sorted so far
        self.deadline = Deadline(stage.timeout_s)
        self.deadline.pause()

    def reject(self, reason: str, message: str, part: int) -> Reject:
        return Reject(self.obj, self.obj.version or "", reason, f"{self.obj.key}: {message}",
                      part=part if part else None)

    def finish(self) -> list[Entry]:
        """Every entry left, in one go (a worker that hands back whole files)."""
        entries: list[Entry] = []
        done = False
        while not done:
            chunk, done = self.step()
            entries.extend(chunk)
        return entries

    def step(self) -> tuple[list[Entry], bool]:
        """The next entries, and whether the file is done. The file's clock runs only in
        here: not while its items wait for room downstream."""
        self.deadline.resume()
        try:
            return self._step()
        finally:
            self.deadline.pause()

    def _step(self) -> tuple[list[Entry], bool]:
        stage = self.stage
        if self.items is None:
            try:
                data, version, extras = stage.read(self.obj, self.obj.version)
            except SourceUnavailable:
                raise  # the source failed, not this file: the engine stops the run
            except ConnectorError as exc:  # its message names the file
                return [Reject(self.obj, self.obj.version or "", RejectReason.UNREADABLE,
                               str(exc))], True
            if self.obj.version != version:
                self.obj = self.obj.with_version(version)
            prev = self.prev
            if (prev is not None and not stage.retry_rejects
                    and prev.same_content(version, stage.fingerprint)):
                data.close()
                return [_touched(prev, self.obj)], True
            # the validator closes the blob when its items end (or it is given up on)
            self.items = stage.validator.fit(self.obj, data, extras, self.deadline)
        chunk: list[Entry] = []
        size = 0
        try:
            for entry in self.items:
                chunk.append(entry)
                self.emitted += 1
                size += entry.payload_bytes if isinstance(entry, Item) else 0
                if len(chunk) >= self.CHUNK_ITEMS or size >= self.CHUNK_BYTES:
                    return chunk, False
        except SourceUnavailable:
            raise  # the source failed while a parser read the file: not the file's fault
        except Exception as exc:  # a parser bug on one file must not end the run
            log.exception("validator failed on %s", self.obj.key)
            chunk.append(self.reject(RejectReason.CORRUPT, f"the validator failed: "
                                     f"{type(exc).__name__}: {exc}", self.emitted))
        return chunk, True


class GroupWork:
    """Several small files validated in one go, with progress another thread can read if it
    gives up waiting: which files are finished, and which one is in progress since when."""

    def __init__(self, works: list[FileWork]) -> None:
        self.works = works
        self.finished: list[tuple[FileWork, list[Entry]]] = []
        self.current: FileWork | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self.started = time.monotonic()

    def overdue(self, limit_s: float) -> bool:
        """The file in progress has taken longer than ``limit_s``."""
        with self._lock:
            return self.current is not None and time.monotonic() - self.started > limit_s

    def run(self) -> None:
        for work in self.works:
            with self._lock:
                if self._stopped:
                    return
                self.current = work
                self.started = time.monotonic()
            entries = work.finish()
            with self._lock:
                if self._stopped:
                    return
                self.finished.append((work, entries))
                self.current = None

    def stop(self) -> tuple[list[tuple[FileWork, list[Entry]]], list[FileWork]]:
        """Freeze: the finished files with their entries, and the rest, the first of which
        is the file in progress if the group did not finish."""
        with self._lock:
            self._stopped = True
            return list(self.finished), self.works[len(self.finished):]


def _touched(prev: FileState, obj: SourceObject) -> FileState:
    return FileState(prev.uri, prev.key, prev.version, obj.size, obj.mtime, prev.fingerprint,
                     prev.status, prev.parts, prev.rejected_parts, prev.reason, obj.companions)
