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

import numpy as np
import numpy.typing as npt

_WORD = re.compile(r"\w+", re.UNICODE)


def _bucket(feature: str, dims: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "big")
    return h % dims, (1.0 if (h >> 63) & 1 else -1.0)


def text_vector(text: str, dims: int) -> npt.NDArray[np.float64]:
    vec = np.zeros(dims, dtype=np.float64)
    for word in _WORD.findall(text.lower()):
        idx, sign = _bucket("w:" + word, dims)
        vec[idx] += sign
        padded = f"<{word}>"
        for i in range(len(padded) - 2):
            idx, sign = _bucket("c:" + padded[i : i + 3], dims)
            vec[idx] += 0.5 * sign
    if not vec.any():  # punctuation only: still deterministic and non-zero
        return bytes_vector(text.encode("utf-8"), dims)
    return vec / np.linalg.norm(vec)


def bytes_vector(data: bytes, dims: int) -> npt.NDArray[np.float64]:
    seed = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
    vec = np.random.default_rng(seed).standard_normal(dims)
    return vec / np.linalg.norm(vec)


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
