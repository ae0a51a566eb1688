"""Google's Files API, as the Batch API uses it: resumable uploads, get, list, download, delete.

Routes (``v1beta`` and ``v1``)::

    POST   /upload/{v}/files                 X-Goog-Upload-Protocol: resumable, Command: start
    POST   /upload/{v}/files?upload_id=ID    Command: upload | upload, finalize (with Offset)
    GET    /{v}/files/{id}                   the File
    GET    /{v}/files                        list (pageSize, pageToken)
    DELETE /{v}/files/{id}
    GET    /{v}/files/{id}:download?alt=media        (what the google-genai SDK calls)
    GET    /download/{v}/files/{id}:download?alt=media

Files live in memory for the emulator's life. Uploaded files are ``UPLOADED``; files the Batch
API writes (its responses) are ``GENERATED`` and carry a ``downloadUri``, as Google's do (the
SDK downloads only those).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pipeline.emulator.checks import ApiFault, invalid

T = TypeVar("T")
DOWNLOAD_CHUNK = 1 << 20  # what a paced download sends at a time


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def not_found(what: str) -> ApiFault:
    return ApiFault(404, "NOT_FOUND", f"{what} not found.")


@dataclass
class StoredFile:
    name: str  # "files/abc123"
    mime_type: str
    declared_bytes: int
    display_name: str | None = None
    source: str = "UPLOADED"
    data: bytearray = field(default_factory=bytearray)
    created: float = field(default_factory=time.time)
    complete: bool = False

    def resource(self, base_url: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "mimeType": self.mime_type, "sizeBytes": str(len(self.data)),
            "createTime": rfc3339(self.created), "updateTime": rfc3339(self.created),
            "expirationTime": rfc3339(self.created + 48 * 3600),
            "sha256Hash": hashlib.sha256(self.data).hexdigest(),
            "uri": f"{base_url}/v1beta/{self.name}",
            "state": "ACTIVE" if self.complete else "PROCESSING", "source": self.source,
        }
        if self.display_name:
            out["displayName"] = self.display_name
        if self.source == "GENERATED":
            out["downloadUri"] = f"{base_url}/download/v1beta/{self.name}:download?alt=media"
        return out


class FileStore:
    def __init__(self, max_file_bytes: int, upload_mb_per_s: float | None = None,
                 download_mb_per_s: float | None = None) -> None:
        self.max_file_bytes = max_file_bytes
        self.upload_mb_per_s = upload_mb_per_s
        self.download_mb_per_s = download_mb_per_s
        self.files: dict[str, StoredFile] = {}
        self._uploads: dict[str, StoredFile] = {}  # upload id -> file being uploaded
        self._lock = threading.Lock()
        # the bytes of the files kept: now, at most so far (what a project's storage holds),
        # and all together
        self.stored_bytes = 0
        self.peak_bytes = 0
        self.total_bytes = 0
        # paced downloads under way, and the most at once so far
        self.downloading = 0
        self.downloads_peak = 0

    def _keep(self, stored: StoredFile) -> None:
        """Keep a complete file (under the lock)."""
        self.files[stored.name] = stored
        self.stored_bytes += len(stored.data)
        self.total_bytes += len(stored.data)
        self.peak_bytes = max(self.peak_bytes, self.stored_bytes)

    def usage(self) -> dict[str, int]:
        """What the store holds (files, their bytes), the most bytes it has held, the bytes of
        every file it was given, and the most paced downloads it sent at once."""
        with self._lock:
            return {"files": len(self.files), "files_bytes": self.stored_bytes,
                    "files_peak_bytes": self.peak_bytes, "files_total_bytes": self.total_bytes,
                    "downloads_peak": self.downloads_peak}

    def add_generated(self, data: bytearray, mime_type: str, display_name: str) -> StoredFile:
        """A file the service made, ``data`` kept as it is (not copied)."""
        stored = StoredFile(f"files/{secrets.token_hex(8)}", mime_type, len(data), display_name,
                            "GENERATED", data, complete=True)
        with self._lock:
            self._keep(stored)
        return stored

    def get(self, name: str) -> StoredFile:
        with self._lock:
            stored = self.files.get(name)
        if stored is None or not stored.complete:
            raise not_found(f"File {name}")
        return stored

    # --- routes -------------------------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        command = request.headers.get("x-goog-upload-command", "").lower()
        upload_id = request.query_params.get("upload_id")
        if upload_id is None:
            return await self._start(request, command)
        with self._lock:
            stored = self._uploads.get(upload_id)
        if stored is None:
            raise not_found(f"Upload {upload_id}")
        body = await request.body()
        if self.upload_mb_per_s:  # the time these bytes take on a link that fast
            await anyio.sleep(len(body) / (self.upload_mb_per_s * 1e6))
        offset = request.headers.get("x-goog-upload-offset")
        if offset is None or not offset.isdigit() or int(offset) != len(stored.data):
            raise invalid(f"X-Goog-Upload-Offset {offset!r} does not match the "
                          f"{len(stored.data)} bytes received so far")
        if len(stored.data) + len(body) > self.max_file_bytes:
            raise invalid(f"The file exceeds the maximum size of {self.max_file_bytes} bytes.")
        stored.data += body
        if "finalize" not in command:
            return Response(b"", headers={"x-goog-upload-status": "active"})
        stored.complete = True
        with self._lock:
            del self._uploads[upload_id]
            self._keep(stored)
        return JSONResponse({"file": stored.resource(_base(request))},
                            headers={"x-goog-upload-status": "final"})

    async def _start(self, request: Request, command: str) -> Response:
        if request.headers.get("x-goog-upload-protocol", "").lower() != "resumable" \
                or command != "start":
            raise invalid("Uploads take the resumable protocol: X-Goog-Upload-Protocol: "
                          "resumable with X-Goog-Upload-Command: start")
        raw = await request.body()
        meta: dict[str, Any] = {}
        if raw:
            try:
                meta = orjson.loads(raw).get("file") or {}
            except (orjson.JSONDecodeError, AttributeError) as exc:
                raise invalid("Invalid JSON payload received.") from exc
        declared = request.headers.get("x-goog-upload-header-content-length", "0")
        size = int(declared) if declared.isdigit() else 0
        if size > self.max_file_bytes:
            raise invalid(f"The file exceeds the maximum size of {self.max_file_bytes} bytes.")
        name = str(meta.get("name") or f"files/{secrets.token_hex(8)}")
        name = name if name.startswith("files/") else f"files/{name}"
        mime = (request.headers.get("x-goog-upload-header-content-type")
                or meta.get("mimeType") or "application/octet-stream")
        upload_id = secrets.token_urlsafe(16)
        with self._lock:
            if name in self.files:
                raise ApiFault(409, "ALREADY_EXISTS", f"File {name} already exists.")
            self._uploads[upload_id] = StoredFile(name, str(mime), size,
                                                  meta.get("displayName"))
        url = f"{_base(request)}/upload/v1beta/files?upload_id={upload_id}"
        return JSONResponse({}, headers={"x-goog-upload-url": url,
                                         "x-goog-upload-status": "active"})

    async def file(self, request: Request) -> Response:
        target = request.path_params["target"]
        file_id, _, method = target.partition(":")
        stored = self.get(f"files/{file_id}")
        if method == "download":
            if self.download_mb_per_s:
                return StreamingResponse(self._counted(self._paced(bytes(stored.data),
                                                                   self.download_mb_per_s)),
                                         media_type=stored.mime_type,
                                         headers={"content-length": str(len(stored.data))})
            return Response(bytes(stored.data), media_type=stored.mime_type)
        if method:
            raise not_found(f"Method {method}")
        if request.method == "DELETE":
            with self._lock:
                if self.files.pop(stored.name, None) is not None:
                    self.stored_bytes -= len(stored.data)
            return JSONResponse({})
        return JSONResponse(stored.resource(_base(request)))

    async def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``chunks``, counted as a download under way until the last is sent (or the client
        went away)."""
        with self._lock:
            self.downloading += 1
            self.downloads_peak = max(self.downloads_peak, self.downloading)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            with self._lock:
                self.downloading -= 1

    @staticmethod
    async def _paced(data: bytes, mb_per_s: float) -> AsyncIterator[bytes]:
        """``data`` a chunk at a time, each after the time it takes on a link that fast."""
        view = memoryview(data)
        for start in range(0, len(data), DOWNLOAD_CHUNK):
            chunk = view[start:start + DOWNLOAD_CHUNK]
            await anyio.sleep(len(chunk) / (mb_per_s * 1e6))
            yield bytes(chunk)

    async def list(self, request: Request) -> Response:
        with self._lock:
            files = [self.files[n] for n in sorted(self.files)]
        found, token = page(request, files, 10)
        body: dict[str, Any] = {"files": [f.resource(_base(request)) for f in found]}
        if token:
            body["nextPageToken"] = token
        return JSONResponse(body)


def page(request: Request, items: list[T], default_size: int) -> tuple[list[T], str | None]:
    """One page of a list call (``pageSize``, ``pageToken``) and the next page's token."""
    size = int(request.query_params.get("pageSize") or default_size)
    start = int(request.query_params.get("pageToken") or 0)
    return items[start:start + size], str(start + size) if start + size < len(items) else None


def _base(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"
