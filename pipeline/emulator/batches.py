"""Google's asynchronous Batch API for embeddings: half price, no per-minute quota, done later.

Routes (``v1beta`` and ``v1``)::

    POST   /{v}/models/{model}:asyncBatchEmbedContent   {"batch": {"displayName", "inputConfig":
               {"requests": {"requests": [{"request", "metadata"}]}} | {"fileName": "files/..."}}}
    GET    /{v}/batches/{id}          the operation: metadata.state, .batchStats, .output
    GET    /{v}/batches               list (pageSize, pageToken)
    POST   /{v}/batches/{id}:cancel
    DELETE /{v}/batches/{id}

A job waits ``batch_delay_s`` (PENDING, then RUNNING), then every request is embedded exactly as
``embedContent`` would (same checks, same vectors). Inline input gets inline output
(``output.inlinedEmbedContentResponses.inlinedResponses[]``, each ``{response: {embedding}} |
{error}`` with the request's metadata); file input (JSONL lines ``{"key", "request"}``) gets a
generated JSONL ``output.responsesFile`` with the key on every line. Outcomes can be injected:
a job that ends FAILED or EXPIRED, and per-request transient errors. Nothing here counts against
the interactive per-minute quota.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.emulator.checks import ApiFault, ParsedRequest, invalid, parse_request
from pipeline.emulator.files import FileStore, not_found, page, rfc3339
from pipeline.emulator.options import EmulatorOptions, Stats
from pipeline.emulator.vectors import request_vectors
from pipeline.memory import in_thread
from pipeline.models import ModelSpec

BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.EmbedContentBatch"
DONE = frozenset({"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED",
                  "BATCH_STATE_EXPIRED"})


@dataclass
class BatchJob:
    name: str
    spec: ModelSpec
    display_name: str | None
    # (key, request, metadata) for every request, in input order
    requests: list[tuple[str | None, Any, Any]]
    input_file: str | None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    state: str = "BATCH_STATE_PENDING"
    succeeded: int = 0
    failed: int = 0
    output: dict[str, Any] | None = None

    def operation(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "@type": BATCH_TYPE, "model": f"models/{self.spec.name}",
            "createTime": rfc3339(self.created), "updateTime": rfc3339(self.updated),
            "state": self.state,
            "batchStats": {"requestCount": str(len(self.requests)),
                           "successfulRequestCount": str(self.succeeded),
                           "failedRequestCount": str(self.failed),
                           "pendingRequestCount": str(len(self.requests) - self.succeeded
                                                      - self.failed)},
        }
        if self.display_name:
            meta["displayName"] = self.display_name
        if self.input_file:
            meta["inputConfig"] = {"fileName": self.input_file}
        if self.state in DONE:
            meta["endTime"] = rfc3339(self.updated)
        if self.output is not None:
            meta["output"] = self.output
        op: dict[str, Any] = {"name": self.name, "metadata": meta}
        if self.state in DONE:
            op["done"] = True
            op["response"] = {**meta, "@type": BATCH_TYPE}
        return op


class BatchJobs:
    def __init__(self, options: EmulatorOptions, files: FileStore, stats: Stats,
                 lock: threading.Lock) -> None:
        self.options = options
        self.files = files
        self.stats = stats
        self._lock = lock
        self.jobs: dict[str, BatchJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._rng = random.Random(options.seed)

    # --- create -------------------------------------------------------------------------------

    async def create(self, request: Request, spec: ModelSpec, raw: bytes) -> Response:
        if len(raw) > self.options.max_batch_inline_bytes:
            raise invalid(f"Request payload size exceeds the limit: "
                          f"{self.options.max_batch_inline_bytes} bytes.")
        try:
            batch = orjson.loads(raw).get("batch")
        except (orjson.JSONDecodeError, AttributeError) as exc:
            raise invalid("Invalid JSON payload received.") from exc
        if not isinstance(batch, dict):
            raise invalid("* AsyncBatchEmbedContentRequest.batch: batch is not specified")
        source = batch.get("inputConfig") or batch.get("input_config") or {}
        file_name = source.get("fileName") or source.get("file_name")
        if file_name:
            requests = self._from_file(str(file_name))
        else:
            inline = (source.get("requests") or {}).get("requests")
            if not isinstance(inline, list) or not inline:
                raise invalid("* EmbedContentBatch.input_config: requests or file_name is "
                              "required")
            requests = [(None, r.get("request") if isinstance(r, dict) else None,
                         r.get("metadata") if isinstance(r, dict) else None) for r in inline]
        job = BatchJob(f"batches/{secrets.token_hex(10)}", spec,
                       batch.get("displayName") or batch.get("display_name"), requests,
                       str(file_name) if file_name else None)
        with self._lock:
            self.jobs[job.name] = job
            self.stats.batch_jobs += 1
        task = asyncio.get_running_loop().create_task(self._process(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return JSONResponse(job.operation())

    def _from_file(self, name: str) -> list[tuple[str | None, Any, Any]]:
        stored = self.files.get(name)
        out: list[tuple[str | None, Any, Any]] = []
        for number, line in enumerate(bytes(stored.data).splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise invalid(f"{name} line {number} is not JSON") from exc
            if not isinstance(entry, dict) or "request" not in entry:
                raise invalid(f"{name} line {number}: each line needs a key and a request")
            out.append((str(entry.get("key")) if entry.get("key") is not None else None,
                        entry["request"], None))
        if not out:
            raise invalid(f"{name} holds no requests")
        return out

    # --- processing ---------------------------------------------------------------------------

    async def _process(self, job: BatchJob) -> None:
        o = self.options
        await anyio.sleep(o.batch_delay_s / 2)
        if job.state in DONE:
            return  # cancelled while pending
        self._set(job, "BATCH_STATE_RUNNING")
        await anyio.sleep(o.batch_delay_s / 2)
        if job.state in DONE:
            return
        if o.batch_outcome != "succeed":
            self._set(job, "BATCH_STATE_FAILED" if o.batch_outcome == "fail"
                      else "BATCH_STATE_EXPIRED")
            return
        results = await in_thread(self._embed_all, job)
        if job.state in DONE:
            return
        if job.input_file is None:
            job.output = {"inlinedEmbedContentResponses": {"inlinedResponses": [
                {**result, **({"metadata": meta} if meta is not None else {})}
                for result, (_, _, meta) in zip(results, job.requests, strict=True)]}}
        else:
            lines = await in_thread(self._responses, job, results)
            if job.state in DONE:
                return  # cancelled meanwhile
            out = self.files.add_generated(lines, "application/jsonl", f"{job.name}-responses")
            job.output = {"responsesFile": out.name}
        self._set(job, "BATCH_STATE_SUCCEEDED")

    def _responses(self, job: BatchJob, results: list[dict[str, Any]]) -> bytearray:
        """The job's results as the lines of its JSONL responses file, made in a worker thread
        (10,000 lines of 768 values take ~0.1 s, while the event loop goes on serving
        downloads) and kept as they were written, not copied again."""
        data = bytearray()
        option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
        for result, (key, _, _) in zip(results, job.requests, strict=True):
            data += orjson.dumps({"key": key, **result}, option=option)
        return data

    def _embed_all(self, job: BatchJob) -> list[dict[str, Any]]:
        """Every request embedded as embedContent would, or its error in Google's shape."""
        results: list[dict[str, Any]] = []
        spec = job.spec
        parsed: list[ParsedRequest] = []
        embedded: list[dict[str, Any]] = []  # the results that get a vector, in order
        for _, body, _ in job.requests:
            if self._rng.random() < self.options.batch_error_rate:
                results.append({"error": {"code": 503, "status": "UNAVAILABLE",
                                          "message": "The model is overloaded. Please try "
                                                     "again later."}})
                job.failed += 1
                continue
            try:
                request = parse_request(body, spec, in_batch=False)
            except ApiFault as fault:
                results.append({"error": {"code": fault.code, "status": fault.status,
                                          "message": fault.message}})
                job.failed += 1
                continue
            parsed.append(request)
            embedded.append({})
            results.append({"response": {"embedding": embedded[-1]}})
        for result, values in zip(embedded, request_vectors(parsed, spec), strict=True):
            result["values"] = values
        job.succeeded += len(parsed)
        with self._lock:
            self.stats.batch_items += len(parsed)
            self.stats.batch_tokens += sum(request.total_tokens for request in parsed)
        return results

    def _set(self, job: BatchJob, state: str) -> None:
        job.state = state
        job.updated = time.time()

    # --- get, list, cancel, delete ------------------------------------------------------------

    async def route(self, request: Request) -> Response:
        target = request.path_params.get("target")
        if target is None:
            return self._list(request)
        job_id, _, method = target.partition(":")
        job = self._job(f"batches/{job_id}")
        if method == "cancel" and request.method == "POST":
            if job.state not in DONE:
                self._set(job, "BATCH_STATE_CANCELLED")
            return JSONResponse({})
        if method:
            raise not_found(f"Method {method}")
        if request.method == "DELETE":
            with self._lock:
                self.jobs.pop(job.name, None)
            return JSONResponse({})
        return Response(orjson.dumps(job.operation(), option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")

    def _job(self, name: str) -> BatchJob:
        with self._lock:
            job = self.jobs.get(name)
        if job is None:
            raise not_found(f"Batch {name}")
        return job

    def _list(self, request: Request) -> Response:
        with self._lock:
            jobs = sorted(self.jobs.values(), key=lambda j: j.created)
        found, token = page(request, jobs, 50)
        body: dict[str, Any] = {"operations": [j.operation() for j in found]}
        if token:
            body["nextPageToken"] = token
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")
