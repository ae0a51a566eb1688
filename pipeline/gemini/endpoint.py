"""Where a job's embeddings come from: Google's API, a gateway, or the in-process emulator.

``embedding_client(job)`` is the one place that turns the job's ``embed`` section into a
:class:`GeminiClient`; for ``provider: emulator`` it starts the emulator on a free loopback port
for the life of the client, so the same client code runs against both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pipeline.config import EmulatorEmbedConfig, JobConfig
from pipeline.gemini.client import GeminiClient
from pipeline.memory import in_thread


@asynccontextmanager
async def embedding_client(job: JobConfig) -> AsyncIterator[GeminiClient]:
    job.require_api_key()
    embed = job.embed
    common = {"model": embed.model, "dims": embed.output_dimensionality,
              "timeout_s": embed.timeout_s, "max_connections": embed.concurrency * 2}
    if isinstance(embed, EmulatorEmbedConfig):
        # The emulator's web stack is imported only by the jobs that start it.
        from pipeline.emulator.server import Emulator, EmulatorOptions

        key = embed.emulator.api_key.get_secret_value() if embed.emulator.api_key else None
        settings = embed.emulator.model_dump(exclude={"api_key"})
        emulator = Emulator(EmulatorOptions(api_key=key, auth="google", **settings))
        await in_thread(emulator.start)
        try:
            async with GeminiClient(base_url=emulator.base_url, api_key=key, auth="google",
                                    **common) as client:  # type: ignore[arg-type]
                yield client
        finally:
            await in_thread(emulator.stop)
        return
    key = embed.api_key.get_secret_value() if embed.api_key else None
    async with GeminiClient(base_url=embed.base_url, api_key=key, auth=embed.auth,
                            api_version=embed.api_version, **common) as client:  # type: ignore[arg-type]
        yield client
