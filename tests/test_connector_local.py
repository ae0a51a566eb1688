from __future__ import annotations

import os
from pathlib import Path

import pytest

from connectors.base import glob_regex
from connectors.local import LocalConnector
from pipeline.config import LocalSourceConfig
from pipeline.errors import ConnectorError, RejectReason
from pipeline.records import Reject, SourceObject


def _connector(root: Path, **kw) -> LocalConnector:
    return LocalConnector(LocalSourceConfig(kind="local", root=root, **kw))


@pytest.mark.parametrize(("pattern", "key", "match"), [
    ("**/*", "a.txt", True), ("**/*", "d/e/a.txt", True), ("*.txt", "d/a.txt", False),
    ("**/*.txt", "d/e/a.txt", True), ("docs/**", "docs/x/y.pdf", True),
    ("img/?.png", "img/a.png", True), ("img/[ab].png", "img/c.png", False),
])
def test_globs(pattern, key, match):
    assert bool(glob_regex(pattern).match(key)) is match


def test_listing_is_sorted_recursive_filtered_and_has_metadata(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "skip.log").write_text("x")
    (tmp_path / "b" / "y.md").write_text("y")
    conn = _connector(tmp_path, include=["**/*.txt", "**/*.md"], exclude=["skip*"])
    listed = list(conn.list())
    assert [o.key for o in listed] == ["a.txt", "b/y.md", "b/z.txt"]
    first = listed[0]
    assert isinstance(first, SourceObject)
    assert first.size == 5 and first.uri == (tmp_path / "a.txt").as_uri()
    assert abs(first.mtime.timestamp() - os.stat(tmp_path / "a.txt").st_mtime) < 1e-3
    assert conn.read(first) == b"hello"


def test_symlinks_never_lead_outside_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (root / "inside.txt").write_text("ok")
    (root / "link-in.txt").symlink_to(root / "inside.txt")
    (root / "link-out.txt").symlink_to(outside)
    (root / "dangling.txt").symlink_to(tmp_path / "missing")
    (root / "dirlink").symlink_to(tmp_path)
    listed = {o.source.key if isinstance(o, Reject) else o.key: o for o in _connector(root).list()}
    assert isinstance(listed["inside.txt"], SourceObject)
    assert isinstance(listed["link-in.txt"], SourceObject)
    out = listed["link-out.txt"]
    assert isinstance(out, Reject) and out.reason == RejectReason.UNREADABLE
    assert "outside the source root" in out.message
    assert isinstance(listed["dangling.txt"], Reject)
    conn = _connector(root)
    listed = {o.source.key if isinstance(o, Reject) else o.key: o for o in conn.list()}
    assert "dirlink" not in listed and conn.skipped == 1  # skipped and counted, not a reject
    assert not any(k.startswith("dirlink/") for k in listed)


def test_a_file_gone_before_reading_is_a_connector_error(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    conn = _connector(tmp_path)
    (obj,) = list(conn.list())
    assert isinstance(obj, SourceObject)
    (tmp_path / "a.txt").unlink()
    with pytest.raises(ConnectorError, match=r"a\.txt: cannot read"):
        conn.read(obj)


def test_file_uri_matches_pathlib_on_awkward_names():
    from connectors.local import file_uri

    for path in ["/tmp/a b/c%d.txt", "/x/é/ü?.md", "/a/#b;c=d&e+f~g.txt", "/p/[x]@y!$z'(1),*.txt"]:
        assert file_uri(path) == Path(path).as_uri()


def test_a_large_file_is_read_where_it_is_and_hashed_the_same(tmp_path, monkeypatch):
    """A file over the spool size is not read into memory: validation reads it by position
    through the handle opened once (its own bytes whatever its name becomes)."""
    import connectors.blob as blob_module
    from connectors.base import content_version

    data = os.urandom(300_000)
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "small.txt").write_bytes(b"small")
    monkeypatch.setattr(blob_module, "SPOOL_BYTES", 100_000)
    conn = _connector(tmp_path)
    objs = {o.key: o for o in conn.list() if isinstance(o, SourceObject)}
    with conn.fetch(objs["big.bin"]) as big, conn.fetch(objs["small.txt"]) as small:
        assert not big.in_memory and small.in_memory
        (tmp_path / "big.bin").rename(tmp_path / "moved.bin")
        assert big.read() == data and content_version(big) == content_version(data)
        assert small.read() == b"small"


def test_a_ranged_blob_fetches_blocks_once_and_counts_them():
    """A blob read by range (plan over a store): blocks fetched on first use, a run of
    missing blocks in one request, kept blocks not fetched again; a failed fetch is kept for
    the caller even when a parser swallowed it."""
    from connectors.blob import RANGE_BLOCK, Blob

    data = os.urandom(10 * RANGE_BLOCK + 123)
    requests: list[tuple[int, int]] = []

    def fetch(start: int, end: int) -> bytes:
        requests.append((start, end))
        return data[start:end]

    blob = Blob.ranged(fetch, len(data))
    assert blob.is_ranged and blob.fetched == 0 and not requests
    assert blob.head(10) == data[:10]
    with blob.open() as reader:
        reader.seek(5 * RANGE_BLOCK - 3)
        assert reader.read(10) == data[5 * RANGE_BLOCK - 3:5 * RANGE_BLOCK + 7]
        reader.seek(-50, os.SEEK_END)
        assert reader.read() == data[-50:]
    assert blob.head(100) == data[:100]  # kept
    assert requests == [(0, RANGE_BLOCK), (4 * RANGE_BLOCK, 6 * RANGE_BLOCK),
                        (10 * RANGE_BLOCK, len(data))]
    assert blob.fetched == 3 * RANGE_BLOCK + 123
    # one request for the rest: blocks 1 to 9 (4 and 5 again: they lie inside the run)
    assert blob.read() == data and blob.fetched == 12 * RANGE_BLOCK + 123

    def failing(start: int, end: int) -> bytes:
        raise ConnectorError("the store went away")

    broken = Blob.ranged(failing, 1000)
    with pytest.raises(ConnectorError):
        broken.head(10)
    assert isinstance(broken.read_error, ConnectorError)


def test_a_small_file_that_grew_or_shrank_since_its_size_was_read_is_read_whole(tmp_path: Path):
    """One read for a small file whose size is as fstat said; one that changed meanwhile is
    read to its end as it is now."""
    from connectors.local import _read_all

    path = tmp_path / "f.txt"
    path.write_bytes(b"x" * 3_000_000)
    for told in (3_000_000, 10, 5_000_000, 0):  # as it is, grown, shrunk, empty when listed
        fd = os.open(path, os.O_RDONLY)
        try:
            assert _read_all(fd, told) == b"x" * 3_000_000
        finally:
            os.close(fd)


def test_a_folder_on_a_network_share_is_told_from_one_on_a_local_disk(tmp_path: Path):
    """Small files from a local disk are read in turn (no thread gains), from a network or
    FUSE share in parallel (each read waits); by the mount table's longest matching mount."""
    from connectors.local import on_network_share

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\n"
                      "server:/export /mnt/nfs nfs4 rw 0 0\n"
                      "/dev/vdb /mnt/nfs/local ext4 rw 0 0\n"
                      "//host/share /mnt/my\\040share cifs rw 0 0\n"
                      "user@host: /mnt/sshfs fuse.sshfs rw 0 0\n")
    table = str(mounts)
    assert not on_network_share("/home/me/corpus", table)
    assert on_network_share("/mnt/nfs/corpus", table)
    assert not on_network_share("/mnt/nfs/local/corpus", table)  # a disk mounted inside
    assert on_network_share("/mnt/my share/corpus", table)
    assert on_network_share("/mnt/sshfs", table)
    assert not on_network_share("/mnt/nfsx", table)  # a prefix of the name is no match
    assert on_network_share("/anywhere", str(tmp_path / "absent"))  # unknown: in parallel
