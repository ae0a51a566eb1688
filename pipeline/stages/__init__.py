"""The stages of a run, one module each, over the records of :mod:`pipeline.records`:

    listing ──▶ validation ──▶ reuse ──▶ packing ──▶ embedding ──▶ writing

Each is a plain object with blocking (or, for embedding, async) calls and no knowledge of the
streams, threads or cluster that carry its records: an engine (:mod:`pipeline.engine`) wires
them. :class:`Stages` is what a run builds and hands to its engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.stages.embedding import Embedder
from pipeline.stages.listing import Listing
from pipeline.stages.packing import BatchLimits
from pipeline.stages.reuse import Reuse
from pipeline.stages.validation import Validation
from pipeline.stages.writing import Writer


@dataclass
class Stages:
    listing: Listing
    validation: Validation
    limits: BatchLimits
    embedder: Embedder
    writer: Writer
    # What is not sent: rows killed runs committed, content the tables or the run already have
    reuse: Reuse
