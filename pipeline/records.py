"""The typed records that flow between stages.

    listing ──SourceObject──▶ validation ──Item──▶ packing ──Batch──▶ embedding ──Vector──▶ writing
                                  └──Reject, FileEnd (and the manifest's FileState)─────────▲

An :class:`Item` is one request to the API (a whole file or one part of it: a page range, a text
chunk, a time range). Its ``id`` is deterministic, so writing it twice cannot make two rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TypeVar, dataclass_transform, overload

import numpy as np
import numpy.typing as npt

_T = TypeVar("_T")


@overload
def record(cls: type[_T], /) -> type[_T]: ...
@overload
def record(*, weakref_slot: bool = False) -> Callable[[type[_T]], type[_T]]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type[_T] | None = None, /, *, weakref_slot: bool = False
           ) -> type[_T] | Callable[[type[_T]], type[_T]]:
    """A record that stages hand on: a dataclass with slots, frozen for the type checker (mypy
    refuses an assignment to a field, in CI) but made with the plain ``__init__``. A frozen
    dataclass's ``__init__`` sets each field through ``object.__setattr__``: 1.5 µs for an
    :class:`Item` against 0.2, and several records are made for every item. Equal records hash
    equal, as frozen ones do."""

    def make(cls: type[_T]) -> type[_T]:
        return dataclass(slots=True, unsafe_hash=True, weakref_slot=weakref_slot)(cls)

    return make if cls is None else make(cls)


class Modality(StrEnum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    VIDEO = "video"
    DOCUMENT = "document"


@record
class SourceObject:
    """A file as a connector lists it. ``version`` is set where the listing knows it (an S3 ETag);
    a local file's version is its content hash, known once it is read."""

    uri: str
    key: str
    size: int
    mtime: datetime
    version: str | None = None
    sidecar: str | None = None  # key of a caption file embedded with this one
    companions: str | None = None  # what the sidecar and metadata row looked like, to diff

    def with_version(self, version: str) -> SourceObject:
        # Positional, not dataclasses.replace: this runs once per file on the hot path.
        return SourceObject(self.uri, self.key, self.size, self.mtime, version, self.sidecar,
                            self.companions)


@record(weakref_slot=True)  # the payload budget sees it go
class Part:
    """One part of a request's content: text or inline bytes with their MIME type."""

    text: str | None = None
    mime: str | None = None
    data: bytes | None = None

    @property
    def payload_bytes(self) -> int:
        text = self.text
        if text is not None:
            # an ASCII text's length is its size in UTF-8 (and isascii() is one flag's read)
            return len(text) if text.isascii() else len(text.encode("utf-8"))
        assert self.data is not None
        return (len(self.data) + 2) // 3 * 4  # base64 size


@record
class Span:
    """Where in the source an item comes from (1-based inclusive pages, 0-based char offsets)."""

    page_start: int | None = None
    page_end: int | None = None
    char_start: int | None = None
    char_end: int | None = None
    time_start_s: float | None = None
    time_end_s: float | None = None


def item_id(uri: str, version: str, part: int, model: str, dims: int) -> str:
    key = f"{uri}\x00{version}\x00{part}\x00{model}\x00{dims}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


@record
class Item:
    """One embedding request: part ``part`` of ``part_count`` of one version of one file."""

    id: str
    source: SourceObject
    version: str
    part: int
    part_count: int
    modality: Modality
    mime: str
    parts: tuple[Part, ...]
    est_tokens: int
    span: Span = field(default_factory=Span)
    text: str | None = None
    title: str | None = None
    source_mime: str | None = None  # the file's sniffed type, when the item was converted
    claimed_mime: str | None = None  # what the file name's extension claims
    sidecar_uri: str | None = None  # the caption file combined into this item
    columns: dict[str, object] | None = None  # user metadata columns

    @property
    def payload_bytes(self) -> int:
        parts = self.parts
        if len(parts) == 1:  # most items: no generator to run
            return parts[0].payload_bytes + 200  # JSON envelope
        return sum(p.payload_bytes for p in parts) + 200


@record
class Extras:
    """What travels with a file besides its bytes: a caption (sidecar or metadata), a title,
    and metadata columns."""

    caption: str | None = None
    title: str | None = None
    sidecar_uri: str | None = None
    columns: dict[str, object] | None = None


@record
class Reject:
    """A file (``part`` None) or one part of it that will not be embedded, with a reason code
    from :class:`pipeline.errors.RejectReason` and a message a person can act on."""

    source: SourceObject
    version: str | None
    reason: str
    message: str
    mime: str | None = None
    part: int | None = None
    # The file had rows before (it is changed, not new): a whole-file reject removes them.
    replaces: bool = False
    key: str | None = None  # the content key of the request the API refused, when it was sent


@record
class FileEnd:
    """The validator is done with a file: ``count`` items and part rejects came out of it.
    The writer marks the file complete once that many outcomes are committed; when the file
    ``replaces`` earlier rows, those its new rows do not overwrite go in the same commit."""

    source: SourceObject
    count: int
    replaces: bool = False


@record
class Committed:
    """An item whose row a killed run already wrote: counted toward its file, not sent again."""

    item: Item


@record
class Vector:
    item: Item
    values: npt.NDArray[np.float32]
    tokens: int
    key: str | None = None  # the content key of the request it answers (GeminiClient)
    # Not paid for: the vector of the same request, from the table or another item of the run
    reused: bool = False


@record
class Batch:
    """Items packed into one batchEmbedContents call."""

    items: tuple[Item, ...]

    @property
    def est_tokens(self) -> int:
        return sum(i.est_tokens for i in self.items)

    @property
    def payload_bytes(self) -> int:
        return sum(i.payload_bytes for i in self.items)


@record
class BatchSupport:
    """Whether an endpoint serves the Batch API, and why we say so (one line)."""

    served: bool
    why: str
    definite: bool = True  # an answer worth remembering (not a transient failure)


@record
class Collected:
    """A Batch API job whose results all went to the writer before this record: it is
    ``collected`` once they are committed (not before: a kill in between would pay again)."""

    display_name: str
