"""The Connector protocol: what every source (local disk, S3, ...) offers the pipeline.

A connector lists objects with the metadata needed to tell what changed (size, mtime and, where
the store knows it without a read, a version such as an ETag), and reads one object's bytes.
Listing is lazy: an iterator, never the whole listing in memory. A listed entry that cannot be
used (a broken link, a link out of the root) comes out as a :class:`Reject`, never dropped.
Blocking I/O is fine here: the runner calls connectors from worker threads.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Protocol

from pipeline.records import Reject, SourceObject


class Connector(Protocol):
    def list(self) -> Iterator[SourceObject | Reject]:
        """Every object under the source, sorted by key."""
        ...

    def read(self, obj: SourceObject) -> bytes:
        """The object's bytes. Raises ConnectorError (TransientConnectorError when retryable)."""
        ...

    def stat(self, key: str) -> SourceObject | None:
        """One object by key (None if absent): for files that travel with another (sidecars)."""
        ...

    def names_in(self, folder: str) -> frozenset[str]:
        """Names of the objects directly in ``folder`` ('' for the root), to find siblings."""
        ...


def content_version(data: bytes) -> str:
    """A version for stores that have none: the content hash."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:32]


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob over '/'-separated keys: ``**`` spans folders, ``*`` and ``?`` do not."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def key_selected(key: str, include: list[str], exclude: list[str]) -> bool:
    return any(glob_regex(p).match(key) for p in include) and not any(
        glob_regex(p).match(key) for p in exclude
    )
