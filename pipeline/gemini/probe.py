"""Does an endpoint serve the Batch API? Known for Google's own host and the emulator, declared
by ``embed.batch_api``, else asked once with a probe whose answer cannot be mistaken.

Gateways (new-api / one-api deployments) forward only ``:embedContent`` and
``:batchEmbedContents``: they answer ``GET {base}/v1beta/batches`` with 404 ``Invalid URL``,
``:asyncBatchEmbedContent`` with a 500 of their own, and a Files upload with 200 and their
dashboard's HTML. A 2xx is therefore no proof: only a JSON object of Google's list shape
(``batches`` / ``operations``, ``nextPageToken``, or nothing at all) says "served".
"""

from __future__ import annotations

from urllib.parse import urlsplit

import anyio
import orjson

from pipeline.config import EmulatorEmbedConfig, GeminiEmbedConfig
from pipeline.errors import TransientEmbedError
from pipeline.gemini.client import ErrorBody, GeminiClient
from pipeline.records import BatchSupport

GOOGLE_HOSTS = frozenset({"generativelanguage.googleapis.com"})
# The keys of Google's ListBatches answer (the SDK reads "operations"; the REST docs say
# "batches"); an empty object is an empty list.
_LIST_KEYS = frozenset({"batches", "operations", "nextPageToken", "unreachable"})


def declared_batch_support(embed: EmulatorEmbedConfig | GeminiEmbedConfig) -> BatchSupport | None:
    """What is known without asking: the emulator and Google's host serve it, the job may say;
    None for a gateway that must be asked."""
    if isinstance(embed, EmulatorEmbedConfig):
        return BatchSupport(True, "the emulator serves the Batch API")
    if embed.batch_api != "auto":
        return BatchSupport(embed.batch_api == "yes", f"embed.batch_api is {embed.batch_api}")
    if urlsplit(embed.base_url).hostname in GOOGLE_HOSTS:
        return BatchSupport(True, "Google's own endpoint serves the Batch API")
    return None


async def probe_batch_api(client: GeminiClient, *, tries: int = 3) -> BatchSupport:
    """Ask ``GET {base}/batches?pageSize=1`` (lists at most one job: costs nothing). A
    transport failure or 5xx is asked again, then answered as not definite (not remembered)."""
    where = f"GET {client.base}/batches"
    for attempt in range(1, tries + 1):
        try:
            response = await client.request("GET", "batches", params={"pageSize": "1"},
                                            check=False)
        except TransientEmbedError as exc:
            last = f"{where} failed: {exc}"
        else:
            code, raw = response.status_code, response.content
            if code == 200:
                return _listing(where, raw)
            said = ErrorBody.parse(raw).message[:160]
            if code < 500 and code not in (408, 429):
                refused = code in (401, 403)
                return BatchSupport(False, f"{where} answered {code}"
                                    + (f" ({said})" if said else ""), definite=not refused)
            last = f"{where} answered {code}" + (f" ({said})" if said else "")
        if attempt < tries:
            await anyio.sleep(0.5 * 2 ** attempt)
    return BatchSupport(False, f"{last} ({tries} tries)", definite=False)


def _listing(where: str, raw: bytes) -> BatchSupport:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        shown = ErrorBody.parse(raw).message[:100]
        return BatchSupport(False, f"{where} answered 200 with something that is not JSON "
                                   f"({shown})")
    if isinstance(doc, dict) and set(doc) <= _LIST_KEYS:
        return BatchSupport(True, f"{where} answered a list of batch jobs")
    keys = ", ".join(sorted(doc)[:5]) if isinstance(doc, dict) else type(doc).__name__
    return BatchSupport(False, f"{where} answered 200 but not with a list of batch jobs "
                               f"({keys})")
