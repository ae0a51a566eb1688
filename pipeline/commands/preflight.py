"""``embedpipe check JOB``: a preflight that costs one tiny call.

One ``embedContent`` of a few words, with the job's model, dimensions and task settings, tells
whether the key is accepted, the model served, the vectors as long as configured and the task
input accepted, and how long a round trip takes. A refused key is asked again in the other auth
styles (a gateway that wants ``raw`` answers 401 to ``bearer``), so a wrong style is named, not
mistaken for a wrong key. Whether the endpoint serves the Batch API is asked as a run would ask
it (:mod:`pipeline.gemini.probe`). Nothing is written anywhere.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pipeline.config import GeminiEmbedConfig, JobConfig
from pipeline.errors import (
    AccessError,
    EmbedError,
    EndpointMismatch,
    TerminalEmbedError,
    TransientEmbedError,
)
from pipeline.gemini.client import EmbedRequest, GeminiClient
from pipeline.gemini.endpoint import embedding_client
from pipeline.gemini.probe import declared_batch_support, probe_batch_api
from pipeline.gemini.tasks import TaskStyle
from pipeline.records import Part

PROBE_TEXT = "embedpipe check: a short text to test the endpoint"
STYLES: tuple[Literal["google", "bearer", "raw"], ...] = ("google", "bearer", "raw")


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the check: what (``key``, ``auth``, ``model``, ``dimensions``, ``task``,
    ``batch_api``, ``latency``), whether it is fine, and what was seen."""

    what: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def check_job(job: JobConfig) -> list[Finding]:
    embed = job.embed
    findings: list[Finding] = []
    style = TaskStyle.for_job(job)
    request = style.document_of((Part(text=PROBE_TEXT),), "embedpipe check")
    async with embedding_client(job) as client:
        started = time.monotonic()
        try:
            response = await client.embed(request)
        except EmbedError as exc:
            findings += await _refused(job, client, request, exc)
        else:
            latency = time.monotonic() - started
            findings += [
                Finding("key", True, "accepted"),
                Finding("model", True, f"{embed.model} is served"),
                Finding("dimensions", True, f"vectors of {len(response.vectors[0])} values, "
                                            "as embed.output_dimensionality says"),
                Finding("task", True, f"task type {request.task_type} accepted"
                        if request.task_type else "task in the text (the model takes no "
                                                  "taskType) accepted"),
                Finding("latency", True, f"{latency * 1000:.0f} ms for one call"),
            ]
        support = declared_batch_support(embed) or await probe_batch_api(client)
        needed = embed.mode == "batch"
        findings.append(Finding(
            "batch_api", support.served or not needed,
            ("served" if support.served else "not served") + f": {support.why}"
            + ("" if support.served else "; mode auto embeds interactively there"
               if not needed else "; embed.mode batch cannot run: set it to auto")))
    return findings


async def _refused(job: JobConfig, client: GeminiClient, request: EmbedRequest,
                   exc: EmbedError) -> list[Finding]:
    """What a failed probe call says, one finding."""
    embed = job.embed
    if isinstance(exc, EndpointMismatch):
        return [Finding("endpoint", False, str(exc))]
    if isinstance(exc, TerminalEmbedError) and "dimensions" in exc.message:
        return [Finding("key", True, "accepted"), Finding("model", True, f"{embed.model} is served"),
                Finding("dimensions", False, f"{exc.message}: the endpoint ignores "
                                             "outputDimensionality (a gateway that drops it?); "
                                             "set embed.output_dimensionality to what it returns")]
    if isinstance(exc, AccessError) and (exc.http_status == 404 or "channel" in str(exc)):
        return [Finding("model", False, str(exc))]
    if isinstance(exc, AccessError) and exc.http_status in (400, 401, 403):
        other = await _style_that_works(job, client, request)
        if other is not None:
            assert isinstance(embed, GeminiEmbedConfig)
            return [Finding("auth", False, f"the key is refused as embed.auth {embed.auth} "
                                           f"sends it, and accepted as {other}: set embed.auth: "
                                           f"{other}")]
        return [Finding("key", False, str(exc))]
    if isinstance(exc, TransientEmbedError):
        return [Finding("endpoint", False, f"no answer that works: {exc}")]
    return [Finding("task", False, f"the call was refused: {exc} (check embed.task_type, "
                                   "embed.document_template)")]


async def _style_that_works(job: JobConfig, client: GeminiClient,
                            request: EmbedRequest) -> str | None:
    """Another auth style the endpoint takes the same key in, if any: the same client (its
    ``options``) but for the style."""
    embed = job.embed
    if not isinstance(embed, GeminiEmbedConfig) or embed.api_key is None:
        return None
    for style in STYLES:
        if style == embed.auth:
            continue
        options: dict[str, Any] = {**client.options, "auth": style}
        async with GeminiClient(**options) as c:
            try:
                await c.embed(request)
            except AccessError:
                continue
            except EmbedError:  # refused for something else: the key itself got through
                pass
            return style
    return None


def passed(findings: list[Finding]) -> bool:
    return all(f.ok for f in findings)
