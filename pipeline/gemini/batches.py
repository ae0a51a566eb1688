"""The asynchronous Batch API for embeddings, over :class:`pipeline.gemini.client.GeminiClient`
(same base URL, auth style and error mapping), with the Files API it needs.

    api = BatchApi(client)
    name = await api.upload(jsonl_bytes, display_name="run-…-0")      # resumable protocol
    job = await api.create(file_name=name, display_name="run-…-0")   # or requests=[…]
    job = await api.get(job.name)                                     # until job.done
    async for key, result in api.results(job): ...                   # streamed, by key

Wire shapes follow the google-genai SDK (``batches.py``, ``files.py``): inline input is
``batch.inputConfig.requests.requests[] = {request, metadata}``, file input is JSONL lines
``{"key", "request"}``; results are ``output.inlinedEmbedContentResponses.inlinedResponses[]``
(in input order, with the request's metadata) or a ``responsesFile`` of ``{"key", "response" |
"error"}`` lines, downloaded as a stream so a large one is never held whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from pipeline.gemini.client import EmbedRequest, GeminiClient, vector_from

DONE_STATES = frozenset({"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED",
                         "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"})
UPLOAD_CHUNK = 8 * 1024 * 1024


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


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One request's result: a vector, or Google's error for that request."""

    values: npt.NDArray[np.float32] | None
    error: dict[str, Any] | None = None


class BatchApi:
    def __init__(self, client: GeminiClient) -> None:
        self.client = client

    def entry(self, key: str, request: EmbedRequest) -> tuple[str, dict[str, Any]]:
        """A request of a job, keyed (the key comes back with its result)."""
        return key, self.client.request_json(request)

    @staticmethod
    def jsonl(entries: list[tuple[str, dict[str, Any]]]) -> bytes:
        """A job's input file: one ``{"key", "request"}`` line per request."""
        return b"\n".join(orjson.dumps({"key": k, "request": r}) for k, r in entries) + b"\n"

    async def upload(self, data: bytes, *, display_name: str,
                     mime_type: str = "application/jsonl") -> str:
        """Upload with the resumable protocol (start, then chunks, the last one finalizing);
        returns the file's name (``files/…``)."""
        root = self.client.base.rsplit("/", 1)
        start = await self.client.request(
            "POST", f"{root[0]}/upload/{root[1]}/files",
            content=orjson.dumps({"file": {"displayName": display_name}}),
            headers={"x-goog-upload-protocol": "resumable", "x-goog-upload-command": "start",
                     "x-goog-upload-header-content-length": str(len(data)),
                     "x-goog-upload-header-content-type": mime_type})
        url = start.headers.get("x-goog-upload-url")
        if not url:
            raise ValueError("the upload was not given an upload URL")
        offset = 0
        while True:
            chunk = data[offset:offset + UPLOAD_CHUNK]
            last = offset + len(chunk) >= len(data)
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
        async for line in self.client.stream_lines(f"{job.responses_file}:download",
                                                   params={"alt": "media"}):
            if line.strip():
                entry = orjson.loads(line)
                yield str(entry.get("key")), self._result(entry)

    def _result(self, entry: dict[str, Any]) -> BatchResult:
        values = ((entry.get("response") or {}).get("embedding") or {}).get("values")
        if values is None:
            return BatchResult(None, entry.get("error") or {"message": "no embedding returned"})
        return BatchResult(vector_from(values, self.client.dims))
