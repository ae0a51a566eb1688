"""Each stage on its own, driven by a plain loop: no engine, no streams, no task group. Real
files, a real Lance table, the real emulator over HTTP."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import anyio
import lancedb
import pytest

from connectors.local import LocalConnector
from pipeline.commands.sample_files import make_quickstart_media, make_text_corpus
from pipeline.config import JobConfig, load_job
from pipeline.emulator.server import Emulator
from pipeline.gemini.client import GeminiClient
from pipeline.gemini.tasks import TaskStyle
from pipeline.models import model_spec
from pipeline.records import Batch, Committed, FileEnd, Item, Vector
from pipeline.sinks.lance import LanceSink, open_db
from pipeline.sinks.tables import Hashes
from pipeline.stages.companions import Companions
from pipeline.stages.embedding import Embedder
from pipeline.stages.listing import Listing, Todo
from pipeline.stages.packing import Packer, limits_for
from pipeline.stages.reuse import Reuse
from pipeline.stages.validation import Sorted, Validation, groups
from pipeline.stages.writing import Writer
from pipeline.state.manifest import EMBEDDED, FileState, Manifest
from pipeline.stats import RunStats
from tests.conftest import manifest_rows, write_job


def _job(tmp_path: Path, src: Path, **extra: object) -> JobConfig:
    return load_job(write_job(tmp_path, src, extra=dict(extra)))


def _stages(job: JobConfig) -> tuple[LocalConnector, Companions, RunStats]:
    connector = LocalConnector(job.source)  # type: ignore[arg-type]
    return connector, Companions(connector, None, None), RunStats(run_id="test")


def _validate_all(job: JobConfig, src: Path) -> tuple[list[Item], Sorted]:
    connector, companions, stats = _stages(job)
    listing = Listing(connector, companions, None, 0, job.fingerprint(), stats)
    validation = Validation(job, connector, companions, stats)
    out = Sorted()
    while (chunk := listing.next_chunk()) is not None:
        todo, _ = listing.diff(chunk)
        for entry in todo:
            done = validation.validate(entry)
            out.items += done.items
            out.outcomes += done.outcomes
    return out.items, out


def test_listing_sorts_new_changed_unchanged_rejected_and_gone(tmp_path: Path):
    src = tmp_path / "src"
    paths = make_text_corpus(src, 4)
    os.mkfifo(src / "pipe")
    job = _job(tmp_path, src)
    connector, companions, stats = _stages(job)
    first = {e.key: e for e in connector.list() if not hasattr(e, "reason")}
    fp = job.fingerprint()

    def state(key: str, version: str = "v") -> FileState:
        o = first[key]
        return FileState(o.uri, key, version, o.size, o.mtime, fp, EMBEDDED, 1, 0, None)

    keys = sorted(first)
    paths[1].write_text("changed since the manifest was written")
    gone = FileState("file:///nowhere/x.txt", "x.txt", "v", 1, datetime.now(UTC), fp,
                     EMBEDDED, 1, 0, None)
    previous = {first[k].uri: state(k) for k in keys[:2]} | {gone.uri: gone}
    listing = Listing(connector, companions, manifest_rows(previous.values()), len(previous), fp,
                      stats)
    todo, rejects = [], []
    while (chunk := listing.next_chunk()) is not None:
        found, bad = listing.diff(chunk)
        todo += found
        rejects += bad
    assert [t.obj.key for t in todo] == keys[1:]  # the touched one is read to check it
    assert [t.prev is not None for t in todo] == [True, False, False]
    assert [r.reason for r in rejects] == ["unsupported"]
    assert (stats.files_seen, stats.files_new, stats.files_changed, stats.files_unchanged,
            stats.files_rejected_at_listing) == (5, 2, 1, 1, 1)
    assert listing.known == 3 and listing.gone().to_pylist() == [gone.uri]


def test_groups_keep_large_files_alone_and_send_the_largest_first():
    def todo(size: int, n: int) -> Todo:
        from pipeline.records import SourceObject
        return Todo(SourceObject(f"file:///{n}", str(n), size, datetime.now(UTC)), None)

    entries = [todo(10, 0), todo(2_000_000, 1), todo(10, 2),
               *(todo(10, 3 + i) for i in range(200)), todo(5_000_000, 203)]
    found = list(groups(entries))
    sizes = [len(g) for g in found]
    assert sizes[:2] == [1, 1] and sum(sizes) == 204 and max(sizes) == 128
    # the longest validations start first (no long file begun last), small ones in order
    assert [g[0].obj.key for g in found[:3]] == ["203", "1", "0"]


def test_validation_yields_items_then_the_files_end(tmp_path: Path):
    src = tmp_path / "src"
    make_quickstart_media(src)  # a 9-page PDF, a PNG, a JPEG
    job = _job(tmp_path, src)
    items, out = _validate_all(job, src)
    by_key: dict[str, list[Item]] = {}
    for item in items:
        by_key.setdefault(item.source.key, []).append(item)
    assert sorted((k, len(v)) for k, v in by_key.items()) == [
        ("field-guide.pdf", 2), ("rainfall-chart.png", 1), ("sunset.jpg", 1)]
    ends = {o.source.key: o.count for o in out.outcomes if isinstance(o, FileEnd)}
    assert ends == {"field-guide.pdf": 2, "rainfall-chart.png": 1, "sunset.jpg": 1}


def test_packing_respects_the_bounds_and_the_quota_share(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 250)
    job = _job(tmp_path, src)
    items, _ = _validate_all(job, src)
    limits = limits_for(job.embed)
    packer = Packer(limits)
    batches: list[Batch] = []
    for item in items:
        if not packer.fits(item, item.payload_bytes):
            batches.append(packer.take())
        packer.add(item, item.payload_bytes)
        if packer.full:
            batches.append(packer.take())
    batches.append(packer.take())
    assert [len(b.items) for b in batches] == [100, 100, 50]
    quota = load_job(write_job(tmp_path, src, embed={
        "provider": "emulator", "model": "gemini-embedding-2", "quota": {"rpm": 600}}))
    assert limits_for(quota.embed).max_requests == 30  # 1/20 of a minute's budget


def test_embedding_a_batch_and_skipping_what_was_paid(tmp_path: Path, emulator: Emulator):
    src = tmp_path / "src"
    make_text_corpus(src, 5)
    job = _job(tmp_path, src)
    items, _ = _validate_all(job, src)
    key = {i.id: f"key-{n}" for n, i in enumerate(items)}.__getitem__
    committed = {items[0].id: "key-0", items[1].id: "another request", items[2].id: None}
    reuse = Reuse(lambda item: key(item.id), [], committed, RunStats(run_id="test"))
    keys, found = reuse.look_up(items)
    send, paid = reuse.route(items, keys, found)
    # adopted: the same request, and a row of an older version (no key); the row made from
    # another request (a template changed since) is embedded again
    assert paid == [Committed(items[0]), Committed(items[2])]
    rest = Batch((items[1], *items[3:]))
    assert tuple(send) == rest.items

    async def embed() -> tuple[list[Vector], int]:
        async with GeminiClient(base_url=emulator.base_url, model="gemini-embedding-2",
                                dims=256) as client:
            stats = RunStats(run_id="test")
            embedder = Embedder(client, model_spec("gemini-embedding-2"),
                                style=TaskStyle.for_job(job), max_attempts=2, stats=stats)
            vectors, rejects = await embedder.embed_batch(rest)
            assert not rejects
            return vectors, stats.api_calls

    vectors, calls = anyio.run(embed)
    assert calls == 1 and [v.item for v in vectors] == list(rest.items)
    assert all(v.values.shape == (256,) for v in vectors)


def test_writing_commits_rows_then_the_manifest_and_guards_deletions(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 3)
    job = _job(tmp_path, src)
    items, out = _validate_all(job, src)
    db = open_db(str(tmp_path / "lance"))
    sink = LanceSink(db, "vectors", "rejects", 256, job.embed.model)
    manifest = Manifest(db, "files")
    stats = RunStats(run_id="r1")
    writer = Writer(sink, manifest, stats, job.fingerprint(), "r1")
    import numpy as np
    for item in items:
        writer.add(Vector(item, np.ones(256, np.float32) / 16, 4))
        assert writer.completed == []  # not complete before its FileEnd
    for outcome in out.outcomes:
        writer.add(outcome)
    assert len(writer.completed) == 3 and stats.files_done == 3
    assert writer.rows == 3  # three rows for the table, three for the manifest: run.flush_rows
    writer.flush()
    table = lancedb.connect(str(tmp_path / "lance"))
    assert table.open_table("vectors").count_rows() == 3
    assert set(manifest.load()) == {i.source.uri for i in items}
    refused = writer.delete([i.source.uri for i in items], known=3, listed=0)
    assert refused is not None and "3 of the 3 files" in refused
    assert table.open_table("vectors").count_rows() == 3
    assert writer.delete([items[0].source.uri], known=10, listed=9) is None
    assert table.open_table("vectors").count_rows() == 2 and stats.files_deleted == 1


@pytest.mark.parametrize("older", [False, True])
def test_digest_columns_are_stored_uncompressed_and_older_tables_keep_theirs(
        tmp_path: Path, older: bool):
    """New tables store hex digests (ids, versions, content keys, the batch log's lists of them)
    without compressing them; a table made before the hint (plain fields) takes the same rows,
    and keeps its schema."""
    import numpy as np
    import pyarrow as pa

    from pipeline.sinks.rows import vectors_schema
    from pipeline.state.batches import BATCHES_SCHEMA, BatchLog
    from pipeline.state.manifest import MANIFEST_SCHEMA
    src = tmp_path / "src"
    make_text_corpus(src, 3)
    job = _job(tmp_path, src)
    items, out = _validate_all(job, src)
    db = open_db(str(tmp_path / "lance"))
    plain = {"vectors": vectors_schema(256), "files": MANIFEST_SCHEMA}
    if older:
        for name, schema in plain.items():
            db.create_table(name, schema=pa.schema([f.remove_metadata() for f in schema]))
        db.create_table("batches", schema=pa.schema([
            pa.field(f.name, pa.list_(pa.string())) if pa.types.is_list(f.type) else f
            for f in BATCHES_SCHEMA]))
    sink = LanceSink(db, "vectors", "rejects", 256, job.embed.model)
    writer = Writer(sink, Manifest(db, "files"), RunStats(run_id="r1"), job.fingerprint(), "r1")
    for item in items:
        writer.add(Vector(item, np.ones(256, np.float32) / 16, 4, key=f"{len(item.id):032x}"))
    for outcome in out.outcomes:
        writer.add(outcome)
    writer.flush()
    log = BatchLog(db)
    log.submitting("job-0", "r1", [i.id for i in items], ["k"] * 3)
    log.set("job-0", status="pending", name="batches/1")  # the lists are written again
    assert [r.item_ids for r in log.open()] == [tuple(i.id for i in items)]
    tables = lancedb.connect(str(tmp_path / "lance"))
    item_hint = tables.open_table("batches").schema.field("item_ids").type.value_field.metadata
    assert item_hint == (None if older else {b"lance-encoding:compression": b"none"})
    hinted = {"vectors": {"id", "version", "content_key"}, "files": {"version", "fingerprint"}}
    for name, digests in hinted.items():
        table = tables.open_table(name)
        rows = table.to_arrow().to_pylist()
        assert len(rows) == 3 and all(r["version"].startswith("sha256:") for r in rows)
        assert {r["run_id"] for r in rows} == {"r1"}  # a flush's constant columns
        written = {r["embedded_at" if name == "vectors" else "updated_at"] for r in rows}
        assert len(written) == 1 and abs(datetime.now(UTC) - written.pop()).total_seconds() < 60
        stored = {f.name for f in table.schema
                  if (f.metadata or {}).get(b"lance-encoding:compression") == b"none"}
        assert stored == (set() if older else digests), (name, stored)
    vectors = tables.open_table("vectors").to_arrow()
    assert sorted(vectors["id"].to_pylist()) == sorted(i.id for i in items)
    assert set(vectors["content_key"].to_pylist()) == {f"{len(items[0].id):032x}"}


def test_a_new_file_waiting_for_its_rows_keeps_no_ids_a_changed_one_does(tmp_path: Path):
    """While its rows are on their way (a backfill's files wait for Batch API results by the
    hundred thousand), a new file's pending entry holds no id sets; a changed file's keeps the
    ids of its new rows, so that the commit deletes only its old rows that were not
    overwritten."""
    import dataclasses

    import numpy as np

    src = tmp_path / "src"
    make_text_corpus(src, 2)
    job = _job(tmp_path, src)
    items, out = _validate_all(job, src)
    ends = [o for o in out.outcomes if isinstance(o, FileEnd)]
    assert len(ends) == 2 and not any(e.replaces for e in ends)
    db = open_db(str(tmp_path / "lance"))
    writer = Writer(LanceSink(db, "vectors", "rejects", 256, job.embed.model),
                    Manifest(db, "files"), RunStats(run_id="r1"), job.fingerprint(), "r1")
    new, changed = ends[0], dataclasses.replace(ends[1], replaces=True)
    writer.add(new)
    writer.add(changed)
    pending = {p.obj.uri: p for p in writer.pending.values()}
    assert pending[new.source.uri].ids is None and pending[new.source.uri].reject_ids is None
    assert pending[changed.source.uri].ids == set()
    for item in items:
        writer.add(Vector(item, np.ones(256, np.float32) / 16, 4))
    assert writer.pending == {} and len(writer.completed) == 2
    assert writer.replaced == {changed.source.uri: (
        {i.id for i in items if i.source.uri == changed.source.uri}, set())}


def test_a_sink_that_began_empty_finds_the_keys_it_wrote_as_a_query_of_the_table_does(
        tmp_path: Path):
    """A backfill's table holds only what the run wrote: find_keys answers from the keys the
    sink wrote (no query per chunk of items), and gives what a query of the table gives; rows
    are appended while their ids are new, and merged once one was written before."""
    import numpy as np

    src = tmp_path / "src"
    make_text_corpus(src, 4)
    job = _job(tmp_path, src)
    items, _ = _validate_all(job, src)
    db = open_db(str(tmp_path / "lance"))
    fresh = LanceSink(db, "vectors", "rejects", 256, job.embed.model)
    keys = [f"{n:032x}" for n in range(len(items))]
    assert fresh.find_keys(keys) == {}
    written = [Vector(item, np.full(256, n / 16, np.float32), 4 + n, key=keys[n])
               for n, item in enumerate(items[:3])]
    fresh.write(written, [], "r1", {})
    fresh.write(written[1:], [], "r1", {})  # written again: merged, not appended twice
    assert fresh.vectors.count_rows() == 3
    reopened = LanceSink(db, "vectors", "rejects", 256, job.embed.model)  # queries the table
    for sink in (fresh, reopened):
        found = sink.find_keys(keys)
        assert sorted(found) == keys[:3]
        for n, key in enumerate(keys[:3]):
            values, tokens = found[key]
            assert tokens == 4 + n and np.allclose(values, n / 16)


def test_hashes_answer_as_a_set_does_across_their_merges(monkeypatch: pytest.MonkeyPatch):
    """The compact set of hashes a fresh table's writer keeps (sorted array + the latest in a
    set, merged in as they grow) says what a Python set says, before and after each merge."""
    import numpy as np

    monkeypatch.setattr(Hashes, "MERGE_AT", 8)
    rng = np.random.default_rng(7)
    hashes, reference = Hashes(), set()
    for _ in range(60):
        chunk = rng.integers(-2**63, 2**63 - 1, size=int(rng.integers(0, 12)), dtype=np.int64)
        # some added again: merged already or not (a replaced file's ids are), counted once
        again = rng.permutation(np.array(sorted(reference), dtype=np.int64))[:3]
        chunk = np.concatenate([chunk, again])
        probe = np.concatenate([chunk, rng.integers(-2**63, 2**63 - 1, size=5, dtype=np.int64),
                                np.array(sorted(reference)[:3], dtype=np.int64)])
        assert hashes.contains(probe).tolist() == [int(h) in reference for h in probe]
        hashes.add(chunk)
        reference |= set(chunk.tolist())
        assert len(hashes) == len(reference)
    assert hashes.contains(np.array(sorted(reference), dtype=np.int64)).all()


def test_leads_go_once_their_rows_are_committed_and_no_item_will_come(tmp_path: Path):
    """A lead holds its vector until its row is committed and the next routing; once no item
    will come any more (a Batch API backfill collects most results after its last item was
    routed), a committed lead goes at once: the run does not keep every vector it made."""
    import numpy as np

    src = tmp_path / "src"
    make_text_corpus(src, 4)
    job = _job(tmp_path, src)
    items, _ = _validate_all(job, src)
    reuse = Reuse(lambda item: f"key-{item.id}", [], {}, RunStats(run_id="test"))
    keys, found = reuse.look_up(items)
    send, _ = reuse.route(items[:2], keys[:2], found)
    assert len(send) == 2 and len(reuse.leads) == 2
    for item, key in zip(items[:2], keys[:2], strict=True):
        reuse.answered(Vector(item, np.ones(256, np.float32), 4, key=key))
    reuse.retire(keys[:1])
    assert len(reuse.leads) == 2  # until the next routing (a look-up may be under way)
    reuse.route(items[2:3], keys[2:3], found)
    assert set(reuse.leads) == {keys[1], keys[2]}
    reuse.close()
    reuse.retire(keys[1:2])
    assert set(reuse.leads) == {keys[2]}  # at once: no look-up can be under way
