"""Deterministic stand-in embeddings: same content, same vector; similar texts, similar vectors.

Text is hashed into ``dims`` buckets by word and character-trigram features (the hashing trick,
with a hash-derived sign), so texts sharing words or word pieces point the same way and a search
over emulator vectors ranks by lexical overlap. Binary parts (images, audio, PDFs) get a
pseudo-random unit vector seeded by their bytes. Several parts of one content are summed: one
aggregated vector. blake2b keeps everything stable across processes (unlike ``hash()``).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from pipeline.emulator.checks import ParsedRequest
from pipeline.models import ModelSpec

_WORD = re.compile(r"\w+", re.UNICODE)


@lru_cache(maxsize=1 << 16)
def _word_features(word: str, dims: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Buckets and signed weights of one word: the word itself and its character trigrams.
    Cached: words repeat across a corpus, and hashing dominates the cost."""
    padded = f"<{word}>"
    features = [("w:" + word, 1.0)] + [("c:" + padded[i : i + 3], 0.5)
                                       for i in range(len(padded) - 2)]
    idx, weight = [], []
    for feature, w in features:
        h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "big")
        idx.append(h % dims)
        weight.append(w if (h >> 63) & 1 else -w)
    return tuple(idx), tuple(weight)


def text_vector(text: str, dims: int) -> npt.NDArray[np.float64]:
    idx: list[int] = []
    weight: list[float] = []
    for word in _WORD.findall(text.lower()):
        i, w = _word_features(word, dims)
        idx.extend(i)
        weight.extend(w)
    vec = np.bincount(idx, weights=weight, minlength=dims)  # sums repeated buckets
    if not vec.any():  # punctuation only: still deterministic and non-zero
        return bytes_vector(text.encode("utf-8"), dims)
    return vec / np.linalg.norm(vec)


def bytes_vector(data: bytes, dims: int) -> npt.NDArray[np.float64]:
    seed = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
    vec = np.random.default_rng(seed).standard_normal(dims)
    return vec / np.linalg.norm(vec)


def request_vector(parsed: ParsedRequest, spec: ModelSpec) -> npt.NDArray[np.float32]:
    """The vector the service answers a parsed EmbedContentRequest with (float32, as its values
    are), normalised or not as the model is at that dimensionality."""
    return content_vector(parsed.parts, parsed.dims,
                          spec.is_normalised(parsed.dims)).astype(np.float32)


def content_vector(
    parts: list[str | bytes], dims: int, normalise: bool
) -> npt.NDArray[np.float64]:
    """One vector for one content. Unnormalised output (as gemini-embedding-001 gives below 3072
    dimensions) keeps the direction but gets a content-dependent length between 0.5 and 2."""
    vec = sum(
        (text_vector(p, dims) if isinstance(p, str) else bytes_vector(p, dims) for p in parts),
        np.zeros(dims, dtype=np.float64),
    )
    norm = float(np.linalg.norm(vec))
    vec = vec / norm if norm else bytes_vector(b"", dims)
    if normalise:
        return vec
    digest = hashlib.blake2b(vec.tobytes(), digest_size=2).digest()
    return vec * (0.5 + 1.5 * int.from_bytes(digest, "big") / 65535)
