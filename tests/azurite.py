"""A real Azure Blob Storage server for the tests: Azurite (from npm), started on loopback with
its data in a temp folder, restartable with the same data; containers made with Azure's own
SDK. `.ci/run` installs it; elsewhere the tests that need it skip, saying how to install it."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.azure import AzureConnector

# Azurite's well-known development account (public: it is in Azure's docs and Azurite's).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINERS = ("corpus", "sink", "big", "restart", "spool")
DEFAULT_INSTALL = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embedpipe" / "azurite"
INSTALL_HINT = (f"Azurite is not installed: npm install --prefix {DEFAULT_INSTALL} azurite@3.35.0 "
                "(.ci/run does), or set EMBEDPIPE_AZURITE to its azurite-blob")


def azurite_blob() -> str | None:
    for candidate in (os.environ.get("EMBEDPIPE_AZURITE"),
                      str(DEFAULT_INSTALL / "node_modules" / ".bin" / "azurite-blob"),
                      shutil.which("azurite-blob")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _free_port() -> int:
    """A free port below the kernel's ephemeral range (32768 up), so that no outgoing
    connection takes it while the server restarts on it; apart from SeaweedFS's (11000 up)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(5000, 10999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


class AzuriteServer:
    scheme = "az"
    connector = AzureConnector
    secret = KEY

    def __init__(self, folder: Path) -> None:
        binary = azurite_blob()
        if binary is None:
            if os.environ.get("EMBEDPIPE_REQUIRE_AZURITE"):
                raise RuntimeError(INSTALL_HINT)
            pytest.skip(INSTALL_HINT)
        self.binary = binary
        self.folder = folder
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self.proc: Any = None

    def start(self) -> None:
        log = open(self.folder / "azurite.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [self.binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
             "--location", str(self.folder / "data"), "--silent", "--skipApiVersionCheck",
             "--loose", "--disableTelemetry"],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"azurite exited: see {self.folder / 'azurite.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("Azurite did not start in 60 s")
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        client = BlobServiceClient.from_connection_string(self.connection_string())
        for name in CONTAINERS:
            with contextlib.suppress(ResourceExistsError):
                client.create_container(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
                f"BlobEndpoint={self.endpoint};")

    def store(self, container: str) -> Any:
        from obstore.store import AzureStore

        return AzureStore(container, config={"account_name": ACCOUNT, "account_key": KEY,
                                             "endpoint": self.endpoint},
                          client_options={"allow_http": True})

    def source(self, container: str, prefix: str = "", **extra: Any) -> dict[str, Any]:
        return {"kind": "azure", "container": container, "prefix": prefix,
                "account_name": ACCOUNT, "account_key": KEY, "endpoint_url": self.endpoint,
                **extra}

    def broken_source(self, case: str) -> tuple[dict[str, Any], str]:
        """A source that fails as ``case`` says, and the words its one-line error holds."""
        source = self.source("corpus", "run1")
        if case == "missing-bucket":
            source["container"] = "no-such-container"
            return source, "the container does not exist"
        if case == "wrong-secret":
            source["account_key"] = "bm90LXRoZS1rZXktMTIz" * 4
            return source, "wrong credentials"
        source.update(endpoint_url="http://127.0.0.1:9/devstoreaccount1", max_retries=0,
                      timeout_s=2)
        return source, "cannot be reached"
