"""The object stores' listing built column by column is the same listing, row for row, as the
one built object by object (keys, uris, versions, sizes, times, the globs' choice), on an
in-memory obstore store (the servers' own tests are tests/test_object_stores.py)."""

from __future__ import annotations

import obstore
import pyarrow as pa
import pytest
from obstore.store import MemoryStore

from connectors.base import listing_batches
from connectors.objects import ObjectConnector

KEYS = ["docs/a.pdf", "docs/b.PDF", "docs/deep/c.pdf", "docs/deep/d.txt", "docs/notes/",
        "docs/space name.txt", "docs/x#y~z.txt", "docs/ünï.txt", "docs/[br].md", "other/e.pdf"]


class _Memory(ObjectConnector):
    scheme = "mem"

    def error_code(self, text: str) -> str | None:
        return None


@pytest.fixture(scope="module")
def store() -> MemoryStore:
    mem = MemoryStore()
    for i, key in enumerate(KEYS):
        obstore.put(mem, key, b"x" * i)
    return mem


@pytest.mark.parametrize(("include", "exclude"), [
    (["**/*"], []),
    (["**/*.pdf"], []),
    (["*.pdf", "deep/*"], ["**/*.txt"]),
    (["**/*"], ["deep/**", "space name.txt"]),
    (["**/[!a]*"], []),
    (["**/x#y~z.txt", "**/ünï.txt"], []),
])
def test_the_columnar_listing_is_the_listing(store: MemoryStore, include: list[str],
                                             exclude: list[str]):
    connector = _Memory(store, "bucket", "docs/", include, exclude, "memory", [])
    columnar = pa.Table.from_batches(list(connector.list_batches()))
    by_object = pa.Table.from_batches(list(listing_batches(connector.list())))
    assert columnar.num_rows == by_object.num_rows > 0
    assert columnar.equals(by_object), (columnar.to_pylist(), by_object.to_pylist())
    assert all(u.startswith("mem://bucket/docs/") for u in columnar["uri"].to_pylist())
