"""The stages of a run, one module each, over the records of :mod:`pipeline.records`:

    listing ──▶ validation ──▶ reuse ──▶ packing ──▶ embedding ──▶ writing

Each is a plain object with blocking (or, for embedding, async) calls and no knowledge of the
streams, threads or cluster that carry its records: an engine (:mod:`pipeline.engine`) wires
them. :class:`Stages` is what a run builds (:func:`build_stages`) and hands to its engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from connectors.base import Connector
from pipeline.config import JobConfig
from pipeline.gemini.client import GeminiClient
from pipeline.gemini.limiter import AdaptiveConcurrency, Quota, rate_limiter
from pipeline.gemini.tasks import TaskStyle
from pipeline.models import model_spec
from pipeline.stages.companions import Companions
from pipeline.stages.embedding import Embedder
from pipeline.stages.listing import Listing
from pipeline.stages.packing import BatchLimits, limits_for
from pipeline.stages.reuse import Reuse
from pipeline.stages.validation import Validation
from pipeline.stages.writing import Writer
from pipeline.state.opened import Opened
from pipeline.stats import RunStats


@dataclass
class Stages:
    listing: Listing
    validation: Validation
    limits: BatchLimits
    embedder: Embedder
    writer: Writer
    # What is not sent: rows killed runs committed, content the tables or the run already have
    reuse: Reuse


def build_stages(job: JobConfig, connector: Connector, client: GeminiClient, state: Opened,
                 stats: RunStats, *, manifest_rows: Iterator[pa.RecordBatch], known: int,
                 committed: dict[str, str | None], retry_rejects: bool,
                 allow_mass_delete: bool) -> Stages:
    """The stages of a run of ``job`` over what :func:`~pipeline.state.opened.open_run_state`
    opened: ``manifest_rows`` sorted by uri (``known`` of them), ``committed`` the ids killed
    runs left behind."""
    embed = job.embed
    quota = Quota(rpm=embed.quota.rpm, tpm=embed.quota.tpm, rpd=embed.quota.rpd)
    companions = Companions(connector, job.source.sidecar, job.source.metadata)
    fingerprint = job.fingerprint()
    embedder = Embedder(client, model_spec(embed.model), style=TaskStyle.for_job(job),
                        max_attempts=embed.max_attempts, stats=stats,
                        max_quota_wait_s=embed.max_quota_wait_s,
                        backoff_base_s=embed.backoff_base_s, backoff_cap_s=embed.backoff_cap_s,
                        limiter=rate_limiter(quota),
                        concurrency=AdaptiveConcurrency(embed.concurrency))
    return Stages(
        listing=Listing(connector, companions, manifest_rows, known, fingerprint, stats,
                        retry_rejects=retry_rejects),
        validation=Validation(job, connector, companions, stats, retry_rejects=retry_rejects),
        limits=limits_for(embed),
        embedder=embedder,
        writer=Writer(state.sink, state.manifest, stats, fingerprint, stats.run_id,
                      max_delete_fraction=job.run.max_delete_fraction,
                      allow_mass_delete=allow_mass_delete, hold_changed=state.upgrade is None,
                      on_collected=state.batch_log.collected),
        reuse=Reuse(embedder.key_for, [state.sink, *state.caches], committed, stats,
                    enabled=embed.reuse))
