"""The Batch API path of the embedding stage: items into jobs, job results back into rows.

- :meth:`Batching.accepts`: an item goes to the Batch API when its modality is one the job
  sends there (``embed.batch.modalities``) and its request is small enough
  (``max_request_bytes``); anything else falls back to interactive calls.
- :meth:`Batching.add` fills a job draft (at most ``max_requests`` requests and
  ``max_file_bytes`` of JSONL) and hands back a full one to submit. Each request is keyed by
  its item's deterministic id, so a later run can match results to the items it validates again.
  Display names are deterministic too (``{job}-{run_id}-{n}``): a run killed between recording a
  job and hearing its name finds it again by that name.
- :meth:`Batching.outcomes` turns a finished job's results into vectors (checked and normalised
  as interactive ones are), ``api_rejected`` rejects for requests the API refused, and the items
  worth trying again interactively (a transient error, or no result at all).

Blocking and stream-free; the engine submits, polls and collects
(:mod:`pipeline.engine.batch_driver`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.config import BatchSettings
from pipeline.errors import RejectReason, TerminalEmbedError
from pipeline.gemini.batches import BatchResult, JobInput
from pipeline.gemini.client import EmbedRequest
from pipeline.records import Item, Reject, Vector
from pipeline.stages.embedding import make_vector

TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504})
# What an item awaiting its job's results holds beside its text: its records (item, source,
# span), its id and content key, and their places in the job's dicts (measured: 1,000,000
# texts of ~130 bytes against jobs that took 120 s, all held at once: peak RSS 2,987 MB, ~2.6
# kB an item over the run's ~0.4 GB without them)
HELD_ITEM_BYTES = 2400


def held_item(item: Item, payload: int | None = None) -> tuple[Item, int]:
    """``item`` as a job holds it until its results come, and what that holds in memory
    (about). A payload of bytes is in the job's input (or the service's): the item need not
    keep it; a text is kept for the table's text column, and to embed again if need be."""
    if any(p.data is not None for p in item.parts):
        return replace(item, parts=()), HELD_ITEM_BYTES
    return item, HELD_ITEM_BYTES + (item.payload_bytes if payload is None else payload)


@dataclass
class JobDraft:
    """A Batch API job being filled: its requests (key = item id) as the lines of its input
    file, and the items they are for."""

    display_name: str
    lines: JobInput
    items: dict[str, Item] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # item id -> its request's content key
    held_bytes: int = 0  # what its items hold in memory until its results come (about)

    @property
    def bytes(self) -> int:
        return self.lines.size


@dataclass
class JobOutcome:
    vectors: list[Vector] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    retry: list[Item] = field(default_factory=list)  # to embed interactively
    lost: list[Item] = field(default_factory=list)  # their payload is gone: the next run
    unmatched: int = 0  # results for items this run did not validate (changed files)
    collected: str | None = None  # the job all of whose results came before this


class Batching:
    def __init__(self, settings: BatchSettings, entry: Callable[[str, EmbedRequest],
                                                                 tuple[str, dict[str, Any]]],
                 request: Callable[[Item], EmbedRequest], *, normalise: bool, prefix: str,
                 key: Callable[[EmbedRequest], str]) -> None:
        self.settings = settings
        self._entry = entry
        self._request = request
        self._key = key
        self.normalise = normalise
        self.prefix = prefix  # "{job}-{run_id}"
        self._count = 0
        self.draft: JobDraft | None = None

    def accepts(self, item: Item) -> bool:
        return (str(item.modality) in self.settings.modalities
                and (item.payload_bytes + 2) // 3 * 4 <= self.settings.max_request_bytes)

    def key(self, item: Item) -> str:
        """The content key of what would be sent for ``item`` now."""
        return self._key(self._request(item))

    def add(self, item: Item) -> JobDraft | None:
        """Add an item; returns the job it closed, if adding it closed one."""
        sent = self._request(item)
        payload = item.payload_bytes
        size = len(item.id) + (payload + 2) // 3 * 4 + 256  # about its JSONL line
        full = None
        draft = self.draft
        if draft is not None and draft.lines.count and (
                draft.lines.count >= self.settings.max_requests
                or draft.bytes + size > self.settings.max_file_bytes):
            full, draft = draft, None
        if draft is None:
            draft = self.draft = JobDraft(f"{self.prefix}-{self._count:04d}",
                                          JobInput(self.settings.max_inline_bytes))
            self._count += 1
        draft.lines.add(*self._entry(item.id, sent))
        draft.keys[item.id] = self._key(sent)
        draft.items[item.id], held = held_item(item, payload)
        draft.held_bytes += held
        return full

    def take(self) -> JobDraft | None:
        """The job being filled, if it holds anything."""
        draft, self.draft = self.draft, None
        return draft if draft is not None and draft.lines.count else None

    def outcomes(self, items: dict[str, Item], keys: dict[str, str],
                 results: Iterable[tuple[str, BatchResult]]) -> JobOutcome:
        """Results matched to ``items`` by key (``keys``: their requests' content keys); the
        items matched are removed from it."""
        out = JobOutcome()
        for key, result in results:
            item = items.pop(key, None)
            if item is None:
                out.unmatched += 1
                continue
            if result.values is not None:
                try:
                    out.vectors.append(make_vector(item, result.values, item.est_tokens,
                                                   self.normalise, keys.get(item.id)))
                    continue
                except TerminalEmbedError as exc:
                    result = BatchResult.bad(exc)
            error = result.error or {}
            if int(error.get("code") or 0) in TRANSIENT_CODES:
                (out.retry if item.parts else out.lost).append(item)
                continue
            out.rejects.append(Reject(
                item.source, item.version, RejectReason.API_REJECTED,
                f"{item.source.key} part {item.part + 1}/{item.part_count}: the Batch API "
                f"refused it: {error.get('code')} {error.get('status')}: "
                f"{error.get('message')}", item.mime, item.part, key=keys.get(item.id)))
        return out

    def missing(self, items: dict[str, Item]) -> JobOutcome:
        """Items a finished job gave no result for: tried again interactively, or left to the
        next run when their payload is gone."""
        out = JobOutcome()
        for item in items.values():
            (out.retry if item.parts else out.lost).append(item)
        items.clear()
        return out
