"""What each embedding model accepts: the limits the validator fits items to and the emulator enforces,
and the list prices ``plan`` and the run report use.

The facts are Google's public documentation as the project recorded them (:data:`FACTS_AS_OF`);
:data:`SOURCES` are the pages to check them against. Where Google's docs are unclear the number
is a default the job can override (the ``validate`` section, ``embed.prices``), never a constant
baked into the code paths.
"""

from __future__ import annotations

from dataclasses import dataclass

FACTS_AS_OF = "2026-11"  # when the limits and prices below were last recorded
SOURCES = {
    "models and limits": "https://ai.google.dev/gemini-api/docs/embeddings",
    "prices": "https://ai.google.dev/gemini-api/docs/pricing",
    "quotas": "https://ai.google.dev/gemini-api/docs/rate-limits",
    "Batch API": "https://ai.google.dev/gemini-api/docs/batch-mode",
    "errors": "https://ai.google.dev/gemini-api/docs/troubleshooting",
}

IMAGE_MIMES = frozenset({"image/png", "image/jpeg"})
AUDIO_MIMES = frozenset({"audio/mpeg", "audio/wav"})
VIDEO_MIMES = frozenset({"video/mp4", "video/quicktime"})
PDF_MIME = "application/pdf"

# Token costs the service reports (countTokens for images; documented for generation models).
TOKENS_PER_IMAGE = 258
TOKENS_PER_PDF_PAGE = 258
TOKENS_PER_AUDIO_SECOND = 32
TOKENS_PER_VIDEO_FRAME = 258
VIDEO_MAX_FRAMES = 32

MAX_BATCH_REQUESTS = 100

# Media within this much of a length limit are split, never sent whole: containers, decoders
# and the service measure a few tens of milliseconds apart (an AAC track's encoder delay makes
# a 120.000 s MP4 120.064 s by its header). Segments are cut a second under the limit.
DURATION_MARGIN_S = 0.5

# Google's TaskType enum (google.ai.generativelanguage.v1beta.TaskType), less UNSPECIFIED.
TASK_TYPES = ("RETRIEVAL_QUERY", "RETRIEVAL_DOCUMENT", "SEMANTIC_SIMILARITY", "CLASSIFICATION",
              "CLUSTERING", "QUESTION_ANSWERING", "FACT_VERIFICATION", "CODE_RETRIEVAL_QUERY")
MIN_DIMENSIONS = 128
MAX_DIMENSIONS = 3072


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    max_input_tokens: int
    multimodal: bool
    normalised_at: frozenset[int] | None  # None: normalised at every dimension
    uses_task_type: bool
    max_images_per_request: int = 6
    max_pdf_pages: int = 6
    max_audio_s: float = 180.0
    max_video_s: float = 120.0

    def accepts(self, mime: str) -> bool:
        if mime.startswith("text/"):
            return True
        if not self.multimodal:
            return False
        return mime in IMAGE_MIMES | AUDIO_MIMES | VIDEO_MIMES | {PDF_MIME}

    def is_normalised(self, dims: int) -> bool:
        return self.normalised_at is None or dims in self.normalised_at


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "gemini-embedding-001",
            max_input_tokens=2048,
            multimodal=False,
            normalised_at=frozenset({3072}),
            uses_task_type=True,
        ),
        ModelSpec(
            "gemini-embedding-2",
            max_input_tokens=8192,
            multimodal=True,
            normalised_at=None,
            uses_task_type=False,
        ),
        ModelSpec(
            "gemini-embedding-2-preview",
            max_input_tokens=8192,
            multimodal=True,
            normalised_at=None,
            uses_task_type=False,
        ),
    )
}


def model_spec(name: str) -> ModelSpec:
    """The spec of a known model, or a permissive multimodal default for a model we do not know
    (a gateway may expose a new name); the job's ``validate`` section can tighten it."""
    bare = name.removeprefix("models/")
    return MODELS.get(
        bare,
        ModelSpec(bare, max_input_tokens=2048, multimodal=True, normalised_at=frozenset(),
                  uses_task_type=True),
    )


def text_tokens(text: str) -> int:
    """The token count the emulator reports for text: one token per 4 UTF-8 bytes, at least 1.

    Real tokenizers average about 4 characters per token for English; counting bytes makes
    non-Latin scripts cost more, as they do in practice.
    """
    n = len(text) if text.isascii() else len(text.encode("utf-8"))  # isascii: a flag's read
    return max(1, -(-n // 4))


def conservative_text_tokens(text: str) -> int:
    """An upper bound used to chunk text under a model's limit: one token per 3 UTF-8 bytes."""
    n = len(text) if text.isascii() else len(text.encode("utf-8"))
    return max(1, -(-n // 3))


# USD per 1M input tokens, list prices as of FACTS_AS_OF (SOURCES["prices"]; jobs override them
# with ``embed.prices``). The Batch API is half of these.
# PDF pages are billed as images here: no price for documents is published.
PRICES: dict[str, dict[str, float]] = {
    "gemini-embedding-001": {"text": 0.15},
    "gemini-embedding-2": {"text": 0.20, "image": 0.45, "document": 0.45, "audio": 6.50,
                           "video": 12.00},
    "gemini-embedding-2-preview": {"text": 0.20, "image": 0.45, "document": 0.45,
                                   "audio": 6.50, "video": 12.00},
}


def cost_usd(tokens_by_modality: dict[str, int], prices: dict[str, float]) -> float:
    return sum(n * prices.get(m, prices.get("text", 0.0)) for m, n in
               tokens_by_modality.items()) / 1_000_000
