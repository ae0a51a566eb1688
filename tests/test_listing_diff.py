"""The streaming diff: the listing and the manifest merged as sorted streams, batch by batch.

A reference diff over dicts (what the stage did before it streamed) decides what each file
should be; the stage must agree with it whatever the batch sizes, the names (spaces, accents,
'/' against '-'), and the order the source lists in."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lancedb
import pyarrow as pa
import pytest

from connectors.base import listing_batches
from connectors.local import LocalConnector
from connectors.synthetic import SyntheticConnector
from pipeline.config import LocalSourceConfig, SyntheticSourceConfig
from pipeline.errors import SinkError
from pipeline.records import Reject, SourceObject
from pipeline.stages.companions import Companions
from pipeline.stages.listing import Listing
from pipeline.state.manifest import EMBEDDED, REJECTED, UNREADABLE, FileState, Manifest
from pipeline.stats import RunStats
from tests.conftest import manifest_rows

FP = "fp-1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
NAMES = ["a", "a b", "a-b", "a/b", "a/c/d", "a.b", "b", "é", "z/é/x", "Z", "{x}", "~", "日本"]


class Listed:
    """A connector whose listing is exactly these entries, in this order, in these batches."""

    def __init__(self, entries: list[SourceObject | Reject], batch: int) -> None:
        self.entries, self.batch = entries, batch

    def list_batches(self) -> Iterator[pa.RecordBatch]:
        return listing_batches(self.entries, self.batch)


def _world(seed: int) -> tuple[list[SourceObject | Reject], list[FileState], dict[str, str]]:
    """A listing, a manifest, and what each uri should come out as."""
    rng = random.Random(seed)
    uris = sorted({f"s3://b/{rng.choice(NAMES)}/{rng.choice(NAMES)}{i % 7}" for i in range(300)})
    listing: list[SourceObject | Reject] = []
    manifest: list[FileState] = []
    expect: dict[str, str] = {}
    for uri in uris:
        fate = rng.choice(["new", "unchanged", "changed", "gone", "reject", "retried",
                           "unchanged-stat", "touched"])
        versioned = fate != "unchanged-stat" and fate != "touched"
        obj = SourceObject(uri, uri[7:], 10, T0, "v1" if versioned else None)
        if fate != "new":
            status = UNREADABLE if fate == "retried" else EMBEDDED
            version = "v0" if fate == "changed" else "v1"
            mtime = T0 + timedelta(seconds=5) if fate == "touched" else T0
            manifest.append(FileState(uri, obj.key, version, 10, mtime, FP, status, 1, 0, None))
        if fate == "gone":
            expect[uri] = "gone"
            continue
        if fate == "reject":
            listing.append(Reject(obj, None, "unsupported", "a FIFO"))
        else:
            listing.append(obj)
        expect[uri] = {"unchanged-stat": "unchanged", "touched": "todo", "retried": "todo",
                       "changed": "todo", "new": "todo"}.get(fate, fate)
    return listing, manifest, expect


def _diff(listing: Listing) -> dict[str, str]:
    out: dict[str, str] = {}
    while (chunk := listing.next_chunk()) is not None:
        todo, rejects = listing.diff(chunk)
        out |= {t.obj.uri: "todo" for t in todo} | {r.source.uri: "reject" for r in rejects}
    return out | dict.fromkeys(listing.gone().to_pylist(), "gone")


def _listing(entries: list[SourceObject | Reject], manifest: list[FileState], batch: int,
             manifest_batch: int, stats: RunStats) -> Listing:
    connector = Listed(entries, batch)
    return Listing(connector, Companions(connector, None, None),  # type: ignore[arg-type]
                   manifest_rows(manifest, manifest_batch), len(manifest), FP, stats)


@pytest.mark.parametrize(("seed", "batch", "manifest_batch"),
                         [(1, 1, 1), (2, 7, 3), (3, 64, 500), (4, 500, 7)])
def test_the_merge_agrees_with_the_reference_whatever_the_batch_edges(
        seed: int, batch: int, manifest_batch: int):
    entries, manifest, expect = _world(seed)
    stats = RunStats(run_id="t")
    got = _diff(_listing(entries, manifest, batch, manifest_batch, stats))
    unchanged = {u for u, fate in expect.items() if fate == "unchanged"}
    assert {u: f for u, f in got.items()} == {u: f for u, f in expect.items()
                                             if f != "unchanged"}
    assert stats.files_unchanged == len(unchanged)
    assert stats.files_seen == len(entries)
    assert (stats.files_new + stats.files_changed + stats.files_unchanged
            + stats.files_rejected_at_listing) == len(entries)


def test_a_source_out_of_order_is_still_diffed_right(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="embedpipe.listing")
    entries, manifest, expect = _world(5)
    random.Random(0).shuffle(entries)
    got = _diff(_listing(entries, manifest, 16, 5, RunStats(run_id="t")))
    assert got == {u: f for u, f in expect.items() if f != "unchanged"}
    assert "out of uri order" in caplog.text


def test_a_rejected_file_that_had_rows_replaces_them():
    obj = SourceObject("s3://b/x", "x", 1, T0, "v1")
    state = FileState(obj.uri, "x", "v0", 1, T0, FP, EMBEDDED, 1, 0, None)
    listing = _listing([Reject(obj, None, "unsupported", "a FIFO")], [state], 4, 4,
                       RunStats(run_id="t"))
    chunk = listing.next_chunk()
    assert chunk is not None
    _, (reject,) = listing.diff(chunk)
    assert reject.replaces


def test_retry_rejects_reads_rejected_files_again():
    obj = SourceObject("s3://b/x", "x", 1, T0, "v1")
    state = FileState(obj.uri, "x", "v1", 1, T0, FP, REJECTED, 0, 1, "corrupt")
    for retry, expected in ((False, []), (True, [obj.uri])):
        connector = Listed([obj], 4)
        listing = Listing(connector, Companions(connector, None, None),  # type: ignore[arg-type]
                          manifest_rows([state]), 1, FP, RunStats(run_id="t"),
                          retry_rejects=retry)
        chunk = listing.next_chunk()
        assert chunk is not None
        todo, _ = listing.diff(chunk)
        assert [t.obj.uri for t in todo] == expected


def test_a_manifest_out_of_order_stops_the_diff_before_anything_is_deleted():
    states = [FileState(f"s3://b/{k}", k, "v", 1, T0, FP, EMBEDDED, 1, 0, None)
              for k in ("b", "a")]
    table = pa.Table.from_batches(list(manifest_rows(states, 2)))
    wrong = iter(table.sort_by([("uri", "descending")]).to_batches())
    obj = SourceObject("s3://b/c", "c", 1, T0, "v")
    connector = Listed([obj], 4)
    listing = Listing(connector, Companions(connector, None, None),  # type: ignore[arg-type]
                      wrong, 2, FP, RunStats(run_id="t"))
    chunk = listing.next_chunk()
    assert chunk is not None
    with pytest.raises(SinkError, match="sorted"):
        listing.diff(chunk)


def test_the_local_walk_comes_in_uri_order(tmp_path: Path):
    root = tmp_path / "src"
    for name in ["a b.txt", "a-b.txt", "a/x.txt", "a.txt", "é.txt", "{x}.txt", "Z.txt",
                 "a/b/c.txt", "a-/y.txt", "日本.txt"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    conn = LocalConnector(LocalSourceConfig(kind="local", root=root))
    uris = [o.uri for o in conn.list() if isinstance(o, SourceObject)]
    assert len(uris) == 10 and uris == sorted(uris)


def test_the_manifest_streams_sorted_by_byte_order(tmp_path: Path):
    db = lancedb.connect(tmp_path / "db")
    manifest = Manifest(db, "files")
    names = [f"{a}{b}" for a in NAMES for b in NAMES]
    random.Random(1).shuffle(names)
    states = [FileState(f"s3://b/{n}", n, "v", 1, T0, FP, EMBEDDED, 1, 0, None) for n in names]
    for start in range(0, len(states), 40):  # written in many commits, in no order
        manifest.record(states[start:start + 40], "r1")
    with manifest.sorted_rows(batch_rows=17) as batches:
        got = [u for b in batches for u in b.column("uri").to_pylist()]
    assert got == sorted(s.uri for s in states)
    assert manifest.count() == len(states)
    assert manifest.load()[states[0].uri] == states[0]


def test_the_synthetic_source_changes_the_share_asked_for():
    def versions(generation: int) -> dict[str, str]:
        conn = SyntheticConnector(SyntheticSourceConfig(
            kind="synthetic", count=20_000, generation=generation, changed=0.05))
        return {o.uri: o.version or "" for o in conn.list() if isinstance(o, SourceObject)}

    g0, g1, g2 = versions(0), versions(1), versions(2)
    assert list(g0) == sorted(g0) and len(g0) == 20_000
    changed = sum(g0[u] != g1[u] for u in g0)
    assert 800 < changed < 1200  # 5 % of 20,000
    assert sum(g1[u] != g2[u] for u in g1) == sum(v == "g2" for v in g2.values())
    conn = SyntheticConnector(SyntheticSourceConfig(kind="synthetic", count=5, generation=1))
    obj = next(o for o in conn.list() if isinstance(o, SourceObject))
    assert len(conn.read(obj)) == obj.size and conn.stat(obj.key) == obj


def test_nights_over_a_synthetic_source_embed_only_what_changed(tmp_path: Path):
    """A whole run: the first night embeds everything, a night with nothing changed calls no
    API, a later generation re-embeds exactly the changed objects and replaces their rows."""
    import yaml

    from pipeline.config import load_job
    from pipeline.run import run_job

    def night(generation: int) -> RunStats:
        path = tmp_path / f"job-{generation}.yaml"
        path.write_text(yaml.safe_dump({
            "name": "synthetic",
            "source": {"kind": "synthetic", "count": 3000, "generation": generation,
                       "changed": 0.02},
            "embed": {"provider": "emulator", "model": "gemini-embedding-2",
                      "output_dimensionality": 128, "mode": "interactive"},
            "sink": {"kind": "lance", "uri": str(tmp_path / "lance")}}))
        result = run_job(load_job(path))
        assert result.exit_code == 0
        return result.stats

    first, same, later = night(0), night(0), night(1)
    assert first.items_embedded == 3000 and same.api_calls == 0 and same.files_unchanged == 3000
    changed = SyntheticConnector(SyntheticSourceConfig(kind="synthetic", count=3000, generation=1,
                                                       changed=0.02))
    expected = sum(1 for o in changed.list() if isinstance(o, SourceObject) and o.version == "g1")
    assert later.files_changed == later.items_embedded == expected > 0
    table = lancedb.connect(str(tmp_path / "lance")).open_table("vectors")
    ids = table.to_arrow().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 3000
    assert table.count_rows("version = 'g1'") == expected


def test_a_killed_runs_sort_folder_is_removed_by_the_next_sort(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A run killed while its manifest sort had spilled cannot remove its folder (gigabytes at
    ten million files); the next sort on the host removes the folders of processes gone, and
    only those: a live run's, or another host's, stay."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile

    from pipeline.state.manifest import SPILL_PREFIX

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead, live = int(gone.stdout), subprocess.Popen([sys.executable, "-c",
                                                     "import time; time.sleep(60)"])
    try:
        left = tmp_path / f"{SPILL_PREFIX}{host}-{dead}-abc"
        (left / "sub").mkdir(parents=True)
        (left / "sub" / "spill.tmp").write_bytes(b"x" * 1024)
        kept = [tmp_path / f"{SPILL_PREFIX}{host}-{live.pid}-def",
                tmp_path / f"{SPILL_PREFIX}other-host-{dead}-ghi"]
        for folder in kept:
            folder.mkdir()
        manifest = Manifest(lancedb.connect(tmp_path / "db"), "files")
        manifest.record([FileState("s3://b/a", "a", "v", 1, T0, FP, EMBEDDED, 1, 0, None)],
                        "r1")
        with manifest.sorted_rows() as batches:
            ours = [p for p in tmp_path.iterdir() if p.name.startswith(
                f"{SPILL_PREFIX}{host}-{os.getpid()}-")]
            assert [u for b in batches for u in b.column("uri").to_pylist()] == ["s3://b/a"]
        assert len(ours) == 1 and not ours[0].exists()  # its own, while it sorts, then gone
        assert not left.exists() and all(folder.is_dir() for folder in kept)
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("unit", ["s", "ms", "us"])
def test_timestamps_are_read_back_as_arrow_reads_them(unit: str):
    """Listing and manifest rows turn their timestamps into datetimes from the microseconds
    (faster than Arrow's to_pylist): the same instants, None kept, before 1970 too."""
    from connectors.base import datetimes
    values = [datetime(2026, 12, 7, 8, 47, 8, 226353, tzinfo=UTC), None,
              datetime(1969, 7, 20, 20, 17, 40, 5, tzinfo=UTC),
              datetime(1970, 1, 1, tzinfo=UTC), datetime(2262, 4, 11, tzinfo=UTC)]
    column = pa.array(values, pa.timestamp(unit, tz="UTC"))
    assert datetimes(column) == column.to_pylist()
    assert datetimes(pa.chunked_array([column, column])) == column.to_pylist() * 2
    assert all(v is None or v.utcoffset().total_seconds() == 0 for v in datetimes(column))
