"""The asynchronous Batch API for embeddings, over :class:`pipeline.gemini.client.GeminiClient`
(same base URL, auth style and error mapping), with the Files API it needs.

    api = BatchApi(client)
    lines = JobInput(); lines.add(key, client.request_json(request))  # the JSONL, spooled
    name = await api.upload(lines, display_name="run-…-0")           # resumable protocol
    job = await api.create(file_name=name, display_name="run-…-0")   # or requests=[…]
    job = await api.get(job.name)                                     # until job.done
    async for key, result in api.results(job): ...                   # streamed, by key

Wire shapes follow the google-genai SDK (``batches.py``, ``files.py``): inline input is
``batch.inputConfig.requests.requests[] = {request, metadata}``, file input is JSONL lines
``{"key", "request"}``; results are ``output.inlinedEmbedContentResponses.inlinedResponses[]``
(in input order, with the request's metadata) or a ``responsesFile`` of ``{"key", "response" |
"error"}`` lines, downloaded as a stream so a large one is never held whole.

A job's input is written line by line as its requests come (:class:`JobInput`: in memory while
small, in an anonymous temporary file beyond that, since a job of videos is gigabytes of
base64) and uploaded from there a chunk at a time; each result line is read by simdjson
straight into a buffer (no Python float per value), made float32 and checked with the lines
around it (:class:`_Block`).
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import orjson
import simdjson

from pipeline.errors import ScratchError, TerminalEmbedError
from pipeline.gemini.client import EmbedRequest, GeminiClient, vector_from
from pipeline.gemini.wire import narrowed
from pipeline.memory import in_thread
from pipeline.records import record

DONE_STATES = frozenset({"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED",
                         "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"})
UPLOAD_CHUNK = 8 * 1024 * 1024
# A job's input stays in memory up to this size (an inline job's, at most), else goes to disk.
SPOOL_BYTES = 20_000_000


@dataclass(frozen=True, slots=True)
class BatchJob:
    """What the service says of one batch job."""

    name: str
    state: str
    display_name: str | None = None
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    responses_file: str | None = None
    inline: list[Any] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES

    @classmethod
    def parse(cls, op: dict[str, Any]) -> BatchJob:
        meta = op.get("metadata") or op.get("response") or {}
        stats = meta.get("batchStats") or {}
        output = meta.get("output") or {}
        inline = ((output.get("inlinedEmbedContentResponses")
                   or output.get("inlinedResponses") or {}).get("inlinedResponses"))
        return cls(str(op.get("name", "")), str(meta.get("state", "BATCH_STATE_UNSPECIFIED")),
                   meta.get("displayName"), int(stats.get("requestCount", 0)),
                   int(stats.get("successfulRequestCount", 0)),
                   int(stats.get("failedRequestCount", 0)), output.get("responsesFile"),
                   inline if isinstance(inline, list) else None)


@record
class BatchResult:
    """One request's result: a vector, or Google's error for that request."""

    values: npt.NDArray[np.float32] | None
    error: dict[str, Any] | None = None

    @classmethod
    def bad(cls, exc: TerminalEmbedError) -> BatchResult:
        """The error of a request whose vector is not one: the service's answer was 200."""
        return cls(None, {"code": 200, "status": exc.status or "BAD_RESPONSE",
                          "message": exc.message})


class JobInput:
    """A job's requests as the lines of its JSONL input file, written as they are added."""

    def __init__(self, spool_bytes: int = SPOOL_BYTES) -> None:
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed by close()
            max_size=spool_bytes, prefix="embedpipe-batch-")
        self.count = 0
        self.size = 0

    def add(self, key: str, request: dict[str, Any]) -> int:
        """One request, keyed (the key comes back with its result); its line's length."""
        line = orjson.dumps({"key": key, "request": request}) + b"\n"
        self._write(line)
        self.count += 1
        return len(line)

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            raise ScratchError(
                f"cannot spool a Batch API job's input to the temporary folder "
                f"{tempfile.gettempdir()} ({exc.strerror or exc}): free space there or point "
                "TMPDIR elsewhere") from None
        self.size += len(data)

    def entries(self) -> list[tuple[str, dict[str, Any]]]:
        """The requests by key (an inline job's: small)."""
        self._file.seek(0)
        entries = [orjson.loads(line) for line in self._file]
        return [(e["key"], e["request"]) for e in entries]

    def read(self, size: int) -> bytes:
        """The next ``size`` bytes of the file from the start (blocking)."""
        return self._file.read(size)

    def rewind(self) -> None:
        self._file.seek(0)

    def close(self) -> None:
        self._file.close()


class BatchApi:
    def __init__(self, client: GeminiClient) -> None:
        self.client = client

    def entry(self, key: str, request: EmbedRequest) -> tuple[str, dict[str, Any]]:
        """A request of a job, keyed (the key comes back with its result)."""
        return key, self.client.request_json(request)

    async def upload(self, lines: JobInput, *, display_name: str,
                     mime_type: str = "application/jsonl") -> str:
        """Upload with the resumable protocol (start, then chunks read as they are sent, the
        last one finalizing); returns the file's name (``files/…``)."""
        lines.rewind()
        root = self.client.base.rsplit("/", 1)
        start = await self.client.request(
            "POST", f"{root[0]}/upload/{root[1]}/files",
            content=orjson.dumps({"file": {"displayName": display_name}}),
            headers={"x-goog-upload-protocol": "resumable", "x-goog-upload-command": "start",
                     "x-goog-upload-header-content-length": str(lines.size),
                     "x-goog-upload-header-content-type": mime_type})
        url = start.headers.get("x-goog-upload-url")
        if not url:
            raise ValueError("the upload was not given an upload URL")
        offset = 0
        while True:
            chunk = await in_thread(lines.read, UPLOAD_CHUNK)
            last = offset + len(chunk) >= lines.size
            answer = await self.client.request(
                "POST", url, content=chunk,
                headers={"x-goog-upload-command": "upload, finalize" if last else "upload",
                         "x-goog-upload-offset": str(offset)})
            offset += len(chunk)
            if last:
                return str(orjson.loads(answer.content)["file"]["name"])

    async def create(self, *, display_name: str, file_name: str | None = None,
                     inline: list[tuple[str, dict[str, Any]]] | None = None) -> BatchJob:
        """Submit a job over an uploaded JSONL file, or inline requests (their keys travel in
        each request's metadata)."""
        if (file_name is None) == (inline is None):
            raise ValueError("give either file_name or inline")
        source: dict[str, Any] = ({"fileName": file_name} if file_name is not None else
                                  {"requests": {"requests": [
                                      {"request": r, "metadata": {"key": k}}
                                      for k, r in inline or ()]}})
        body = {"batch": {"displayName": display_name, "inputConfig": source}}
        answer = await self.client.request(
            "POST", f"models/{self.client.model}:asyncBatchEmbedContent",
            content=orjson.dumps(body))
        return BatchJob.parse(orjson.loads(answer.content))

    async def get(self, name: str) -> BatchJob:
        return BatchJob.parse(orjson.loads((await self.client.request("GET", name)).content))

    async def list(self) -> list[BatchJob]:
        jobs: list[BatchJob] = []
        token: str | None = None
        while True:
            params = {"pageSize": "100", **({"pageToken": token} if token else {})}
            page = orjson.loads((await self.client.request("GET", "batches",
                                                           params=params)).content)
            jobs += [BatchJob.parse(op) for op in page.get("operations") or []]
            token = page.get("nextPageToken")
            if not token:
                return jobs

    async def cancel(self, name: str) -> None:
        await self.client.request("POST", f"{name}:cancel")

    async def delete(self, name: str) -> None:
        """Delete a batch job or a file (``batches/…`` or ``files/…``)."""
        await self.client.request("DELETE", name)

    async def results(self, job: BatchJob) -> AsyncIterator[tuple[str, BatchResult]]:
        """Every result of a finished job, by key (inline: the ``key`` of the request's
        metadata, else its position)."""
        if job.inline is not None:
            for index, entry in enumerate(job.inline):
                meta = entry.get("metadata") or {}
                yield str(meta.get("key", index)), self._result(entry)
            return
        if job.responses_file is None:
            return
        parser = simdjson.Parser()
        block = _Block(self.client.dims)
        async for line in self.client.stream_lines(f"{job.responses_file}:download",
                                                   params={"alt": "media"}):
            if not line.strip():
                continue
            if not block.add(parser, line):  # not the usual shape: read the slow way, in order
                for result in block.take(self._result_of_line):
                    yield result
                yield self._result_of_line(line)
            elif block.full:
                for result in block.take(self._result_of_line):
                    yield result
        for result in block.take(self._result_of_line):
            yield result

    def _result_of(self, entry: dict[str, Any]) -> tuple[str, BatchResult]:
        """A responses file's line, read by orjson: by key."""
        return str(entry.get("key")), self._result(entry)

    def _result(self, entry: dict[str, Any]) -> BatchResult:
        """A request's result; a vector that is not one (the wrong size, values that are no
        finite numbers) is that request's error, as a bad vector in an interactive answer is
        (the rest of the job is written, and the next download would hold it again)."""
        values = ((entry.get("response") or {}).get("embedding") or {}).get("values")
        if values is None:
            return BatchResult(None, entry.get("error") or {"message": "no embedding returned"})
        try:
            if not isinstance(values, list):
                raise TerminalEmbedError("an embedding's values are not a list",
                                         status="BAD_RESPONSE")
            return BatchResult(vector_from(values, self.client.dims))
        except TerminalEmbedError as exc:
            return BatchResult.bad(exc)

    def _result_of_line(self, line: bytes) -> tuple[str, BatchResult]:
        """A responses file's line read by orjson (an error, special floats, a bad line)."""
        try:
            whole = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise TerminalEmbedError("a Batch API responses file holds a line that is "
                                     "not JSON", status="BAD_RESPONSE") from None
        if not isinstance(whole, dict):  # JSON, but no result: "[1, 2]", a string
            raise TerminalEmbedError("a Batch API responses file holds a line that is not "
                                     "a result (a JSON object)", status="BAD_RESPONSE"
                                     ) from None
        return self._result_of(whole)


class _Block:
    """Result lines of the usual shape, their values read by simdjson straight into a buffer,
    then made float32 and checked together, a block of lines at a time (one line at a time,
    numpy's calls took 5 of a line's 17 µs)."""

    VALUES = 1 << 16  # values in a block (512 KB of float64)

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.size = max(1, self.VALUES // dims)
        self.keys: list[str] = []
        self.values: list[bytes] = []
        self.lines: list[bytes] = []

    @property
    def full(self) -> bool:
        return len(self.keys) >= self.size

    def add(self, parser: simdjson.Parser, line: bytes) -> bool:
        """Take ``line`` if it is a result of ``dims`` values; False if it is not."""
        try:
            entry = parser.parse(line)
            if not isinstance(entry, simdjson.Object):
                return False
            values = entry.at_pointer("/response/embedding/values")
            if not isinstance(values, simdjson.Array) or len(values) != self.dims:
                return False
            self.values.append(values.as_buffer(of_type="d"))
            self.keys.append(str(entry.get("key")))
            self.lines.append(line)
            del entry, values  # the parser is used again for the next line
            return True
        except (ValueError, TypeError, KeyError):
            return False

    def take(self, slow: Callable[[bytes], tuple[str, BatchResult]]
             ) -> list[tuple[str, BatchResult]]:
        """The block's results in order, and the block emptied. A vector not finite in float32
        goes to ``slow``, which says what is wrong with it."""
        if not self.keys:
            return []
        wide = np.frombuffer(b"".join(self.values), dtype=np.float64).reshape(-1, self.dims)
        rows, finite = narrowed(wide)
        out = [(key, BatchResult(rows[n])) if finite[n] else slow(self.lines[n])
               for n, key in enumerate(self.keys)]
        self.keys, self.values, self.lines = [], [], []
        return out
