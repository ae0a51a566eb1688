"""One run at a time per output: a lock beside the sink, with a heartbeat.

The lock is a small JSON document (``.embedpipe.lock``) created only if absent: an ``O_EXCL``
file for a local sink, a create-if-absent ``put`` for a sink on an object store. The holder rewrites it
every ``heartbeat_s``. A lock whose heartbeat is older than ``stale_s`` (the holder was killed), or
whose holder is a process on this host that no longer exists, is stale and is taken over.
A second run finds a live lock and stops at once (exit code 5).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import PipelineError, SinkError

LOCK_NAME = ".embedpipe.lock"


class JobLocked(PipelineError):
    """Another run holds the output's lock."""


@dataclass
class Holder:
    run_id: str
    job: str
    host: str
    pid: int
    heartbeat: float

    def alive(self, stale_s: float) -> bool:
        return time.time() - self.heartbeat <= stale_s and not gone(self.host, self.pid)


def gone(host: str, pid: int) -> bool:
    """Whether process ``pid`` of ``host`` is known to have ended. Only this host's can be
    checked (by signal 0); another host's, or another user's, may be alive."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # OverflowError: no such pid can exist
        return False
    return False


class _Backend(Protocol):
    """Create-if-absent, overwrite, read and remove one small document."""

    def create(self, data: bytes) -> bool: ...
    def write(self, data: bytes) -> None: ...
    def read(self) -> bytes | None: ...
    def remove(self) -> None: ...


class _LocalBackend:
    def __init__(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(folder, exc) from exc
        self.path = folder / LOCK_NAME

    def create(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise _unwritable(self.path.parent, exc) from exc
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def write(self, data: bytes) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _unwritable(folder: Path, exc: OSError) -> SinkError:
    """The sink folder cannot take the lock: the run's failure (exit 3), in one line."""
    return SinkError(f"cannot write the lock file in the sink folder {folder}: "
                     f"{exc.strerror or exc}; check that sink.uri names a folder this user "
                     "may create and write (nothing was done)")


class _ObjectBackend:
    """The lock file on an object store (S3, Azure): created only if absent, atomically."""

    def __init__(self, store: Any, prefix: str) -> None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        self.obstore = obstore
        self.store = store
        self.key = f"{prefix.strip('/')}/{LOCK_NAME}".lstrip("/")
        self.exists_errors = (AlreadyExistsError, PreconditionError)
        self.missing = NotFoundError

    def create(self, data: bytes) -> bool:
        try:
            self.obstore.put(self.store, self.key, data, mode="create")
        except self.exists_errors:
            return False
        return True

    def write(self, data: bytes) -> None:
        self.obstore.put(self.store, self.key, data)

    def read(self) -> bytes | None:
        try:
            return bytes(self.obstore.get(self.store, self.key).bytes())
        except self.missing:
            return None

    def remove(self) -> None:
        with contextlib.suppress(self.missing):
            self.obstore.delete(self.store, self.key)


class JobLock:
    def __init__(self, sink_uri: str, run_id: str, job: str, *,
                 store: tuple[Any, str] | None = None, stale_s: float = 120.0,
                 heartbeat_s: float = 15.0) -> None:
        """``store``: an object store and the sink's folder in it, for a sink on one
        (:func:`connectors.sink_options.sink_object_store`); else the lock is a local file."""
        self.backend: _Backend = (_ObjectBackend(*store) if store is not None
                                  else _LocalBackend(Path(sink_uri)))
        self.sink_uri = sink_uri
        self.holder = Holder(run_id, job, socket.gethostname(), os.getpid(), time.time())
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s
        self.took_over: Holder | None = None

    def _doc(self) -> bytes:
        self.holder.heartbeat = time.time()
        return json.dumps(self.holder.__dict__).encode()

    def _current(self) -> Holder | None:
        raw = self.backend.read()
        if raw is None:
            return None
        try:
            return Holder(**json.loads(raw))
        except (ValueError, TypeError):
            return Holder("?", "?", "?", -1, 0.0)  # unreadable: treated as stale

    def acquire(self) -> None:
        for _ in range(3):
            if self.backend.create(self._doc()):
                return
            current = self._current()
            if current is None:
                continue  # released meanwhile: try again
            if current.alive(self.stale_s):
                age = time.time() - current.heartbeat
                raise JobLocked(
                    f"{self.sink_uri} is being written by run {current.run_id} of job "
                    f"{current.job} (pid {current.pid} on {current.host}, heartbeat {age:.0f} s "
                    f"ago); this run stops. A lock older than {self.stale_s:.0f} s is taken over.")
            self.took_over = current
            self.backend.remove()
        raise JobLocked(f"{self.sink_uri}: could not take the lock (another run raced for it)")

    def live_run(self) -> str | None:
        """The run id of the live holder, if any (read only: for ``status``)."""
        current = self._current()
        return current.run_id if current is not None and current.alive(self.stale_s) else None

    def beat(self) -> None:
        self.backend.write(self._doc())

    def release(self) -> None:
        current = self._current()
        if current is not None and current.run_id == self.holder.run_id:
            self.backend.remove()
