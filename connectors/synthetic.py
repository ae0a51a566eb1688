"""A synthetic source for load tests: millions of small texts with no files behind them.

Object ``i`` is ``obj/<i, 10 digits>.txt`` (so key order is number order), its body a short text
made from ``i``, its version and ``seed``, padded to one size for the whole source. Its version is
the last generation, up to the job's, that picked it: generation h > 0 picks object i when a
64-bit mix of (seed, h, i) falls under ``changed``. Everything is computed, column by column, so
listing ten million objects costs what building their Arrow columns costs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import LISTING_SCHEMA, listed_objects
from connectors.blob import Blob
from pipeline.config import SyntheticSourceConfig
from pipeline.errors import ConnectorError
from pipeline.records import Reject, SourceObject

BATCH = 65_536
EPOCH_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z: generation g is g hours later
# 40 words: prime to the step 13 that picks them
_WORDS = (
    "river", "stone", "lantern", "meadow", "copper", "harbor", "signal", "orchard", "velvet",
    "summit", "glacier", "thunder", "willow", "beacon", "canyon", "ember", "falcon", "garnet",
    "island", "jasmine", "kestrel", "lagoon", "marble", "nectar", "oasis", "prairie", "quartz",
    "raven", "saffron", "timber", "umber", "valley", "walnut", "yonder", "zephyr", "anchor",
    "bramble", "cedar", "dune", "bell",
)


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser: neighbouring inputs give unrelated outputs."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class SyntheticConnector:
    reads_wait = True  # its bodies are made in memory; read in parallel, as the scale bench ran

    def __init__(self, config: SyntheticSourceConfig) -> None:
        self.config = config
        self.base = f"synthetic://seed-{config.seed}/"
        self.size = 34 + 9 * config.words  # every body is padded to this many bytes
        self._threshold = np.uint64(min(int(config.changed * 2.0**64), 2**64 - 1))

    def versions(self, first: int, count: int) -> npt.NDArray[np.int64]:
        """The version (a generation) of objects first .. first + count - 1."""
        ids = np.arange(first, first + count, dtype=np.uint64)
        version = np.zeros(count, dtype=np.int64)
        with np.errstate(over="ignore"):
            for h in range(1, self.config.generation + 1):
                salt = np.uint64((self.config.seed << 20) ^ h) * np.uint64(0x9E3779B97F4A7C15)
                picked = _mix(ids * np.uint64(0xD1B54A32D192ED03) + salt) < self._threshold
                version[picked] = h
        return version

    def list_batches(self) -> Iterator[pa.RecordBatch]:
        for first in range(0, self.config.count, BATCH):
            n = min(BATCH, self.config.count - first)
            numbers = pc.utf8_lpad(pc.cast(pa.array(np.arange(first, first + n)), pa.string()),
                                   10, "0")
            keys = pc.binary_join_element_wise("obj/", numbers, ".txt", "")
            version = self.versions(first, n)
            yield pa.RecordBatch.from_arrays([
                pc.binary_join_element_wise(self.base, keys, ""),
                keys,
                pc.binary_join_element_wise("g", pc.cast(pa.array(version), pa.string()), ""),
                pa.array(np.full(n, self.size, dtype=np.int64)),
                pa.array(EPOCH_US + version * 3_600_000_000, pa.int64()).cast(
                    pa.timestamp("us", tz="UTC")),
                pa.nulls(n, pa.string()),
                pa.nulls(n, pa.string()),
            ], schema=LISTING_SCHEMA)

    def list(self) -> Iterator[SourceObject | Reject]:
        for batch in self.list_batches():
            yield from listed_objects(batch)

    def _number(self, key: str) -> int:
        if not (key.startswith("obj/") and key.endswith(".txt") and key[4:-4].isdigit()
                and len(key) == 18 and int(key[4:-4]) < self.config.count):
            raise ConnectorError(f"{key}: no such synthetic object", uri=self.base + key)
        return int(key[4:-4])

    def body(self, number: int, version: int) -> bytes:
        words = " ".join(_WORDS[(number * 7 + k * 13 + version * 5 + self.config.seed) % len(_WORDS)]
                         for k in range(self.config.words))
        text = f"object {number:010d} version {version:06d}: {words}."
        return text.encode().ljust(self.size)[: self.size]

    def read(self, obj: SourceObject) -> bytes:
        number = self._number(obj.key)
        return self.body(number, int(self.versions(number, 1)[0]))

    def fetch(self, obj: SourceObject) -> Blob:
        return Blob.of(self.read(obj))

    def ranged(self, obj: SourceObject) -> Blob:
        return self.fetch(obj)

    def stat(self, key: str) -> SourceObject | None:
        try:
            number = self._number(key)
        except ConnectorError:
            return None
        version = int(self.versions(number, 1)[0])
        mtime = datetime.fromtimestamp((EPOCH_US + version * 3_600_000_000) / 1e6, tz=UTC)
        return SourceObject(self.base + key, key, self.size, mtime, f"g{version}")

    def names_in(self, folder: str) -> frozenset[str]:
        return frozenset()
