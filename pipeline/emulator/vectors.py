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
import threading
from array import array
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from pipeline.emulator.checks import ParsedRequest
from pipeline.models import ModelSpec

_WORD = re.compile(r"\w+", re.UNICODE)
ROWS_VALUES = 1 << 16  # values in one matrix of request_vectors (512 KB of float64)


@lru_cache(maxsize=1 << 16)
def _word_features(word: str, dims: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Buckets and signed weights of one word: the word itself and its character trigrams.
    Cached: words repeat across a corpus, and hashing dominates the cost; trigrams repeat
    across words (a corpus's numbers are new words made of a thousand trigrams)."""
    padded = f"<{word}>"
    features = [_feature("w:" + word, 1.0, dims)] + [_trigram(padded[i : i + 3], dims)
                                                     for i in range(len(padded) - 2)]
    return tuple(idx for idx, _ in features), tuple(weight for _, weight in features)


def _feature(feature: str, weight: float, dims: int) -> tuple[int, float]:
    """A feature's bucket and its weight, signed by its hash."""
    h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "big")
    return h % dims, (weight if (h >> 63) & 1 else -weight)


@lru_cache(maxsize=1 << 16)
def _trigram(trigram: str, dims: int) -> tuple[int, float]:
    return _feature("c:" + trigram, 0.5, dims)


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


def request_vectors(requests: Sequence[ParsedRequest], spec: ModelSpec
                    ) -> list[npt.NDArray[np.float32]]:
    """The vectors of many requests, each exactly (bit for bit) what :func:`request_vector`
    gives it. Requests of one text are hashed together, a chunk at a time: one ``bincount``
    over the chunk's buckets (row by row, each bucket summed in the same order) and each step
    after it on the chunk's matrix, not a dozen numpy calls a text. Norms are taken row by row
    with ``dot``, as ``np.linalg.norm`` takes them, so that they round alike."""
    out: list[npt.NDArray[np.float32] | None] = [None] * len(requests)
    by_dims: dict[int, list[int]] = {}
    for n, parsed in enumerate(requests):
        if len(parsed.parts) == 1 and isinstance(parsed.parts[0], str):
            by_dims.setdefault(parsed.dims, []).append(n)
    for dims, rows in by_dims.items():
        step = max(1, ROWS_VALUES // dims)  # a matrix that stays in the cache
        for first in range(0, len(rows), step):
            chunk = rows[first:first + step]
            texts = [str(requests[n].parts[0]) for n in chunk]
            for row, vector in zip(chunk, _text_rows(texts, dims, spec.is_normalised(dims)),
                                   strict=True):
                out[row] = vector
    return [request_vector(requests[n], spec) if vector is None else vector
            for n, vector in enumerate(out)]


def _text_rows(texts: list[str], dims: int, normalise: bool
               ) -> list[npt.NDArray[np.float32] | None]:
    """:func:`content_vector` of one text each, as float32 rows of one matrix (None: a text
    without a word, left to the single path)."""
    buckets, weights, counts = _vocabulary(dims).features(texts)
    flat = np.bincount(buckets + np.repeat(np.arange(len(texts), dtype=np.int64) * dims, counts),
                       weights=weights, minlength=len(texts) * dims).astype(np.float64, copy=False)
    matrix = flat.reshape(len(texts), dims)
    empty = ~np.any(matrix, axis=1, keepdims=False)
    for _ in range(2):  # text_vector's normalising, then content_vector's
        norms = np.array([np.sqrt(row.dot(row)) for row in matrix])
        norms[empty] = 1.0
        matrix = matrix / norms[:, None]
    if not normalise:
        for row in matrix:
            row *= _length(row)
    rows = matrix.astype(np.float32)
    return [None if empty[n] else rows[n] for n in range(len(texts))]


class _Vocabulary:
    """The words seen (up to ``limit``; then it starts again), numbered, with every word's
    features in two flat arrays: a batch's texts become buckets by a dictionary look-up a word
    and numpy, not by a cached call and two list extends a word (~0.4 µs, ~40 a text)."""

    def __init__(self, dims: int, limit: int = 1 << 16) -> None:
        self.dims = dims
        self.limit = limit
        self._lock = threading.Lock()  # batch jobs are embedded in worker threads
        self._clear()

    def _clear(self) -> None:
        self.ids: dict[str, int] = {}
        # word n: its features at starts[n]:starts[n + 1] of buckets and weights; arrays that
        # grow by a word at a time, seen by numpy without a copy
        self.starts = array("q", [0])
        self.buckets = array("q")
        self.weights = array("d")

    def features(self, texts: list[str]
                 ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64],
                            npt.NDArray[np.int64]]:
        """Every feature of every word of ``texts`` in order (bucket, signed weight), and how
        many features each text has."""
        with self._lock:
            if len(self.ids) > self.limit:
                self._clear()
            get = self.ids.get
            words: list[int] = []
            per_text: list[int] = []
            for text in texts:
                in_text = _WORD.findall(text.lower())
                found = list(map(get, in_text))
                if None in found:
                    found = [self._add(word) if n is None else n
                             for word, n in zip(in_text, found, strict=True)]
                words.extend(found)  # type: ignore[arg-type]  # no None is left
                per_text.append(len(found))
            ids = np.asarray(words, dtype=np.int64)
            # views of the arrays, let go of before they grow again (at the next call)
            all_starts = np.frombuffer(self.starts, dtype=np.int64)
            starts = all_starts[ids]
            lengths = all_starts[ids + 1] - starts
            del all_starts
            ends = np.concatenate(([0], np.cumsum(lengths)))  # features before word n
            at = np.arange(ends[-1], dtype=np.int64) + np.repeat(starts - ends[:-1], lengths)
            counts = np.diff(ends[np.cumsum(per_text)], prepend=0)
            return (np.frombuffer(self.buckets, dtype=np.int64)[at],
                    np.frombuffer(self.weights, dtype=np.float64)[at], counts)

    def _add(self, word: str) -> int:
        n = self.ids.get(word)
        if n is not None:  # twice in one text
            return n
        buckets, weights = _word_features(word, self.dims)
        self.buckets.extend(buckets)
        self.weights.extend(weights)
        self.starts.append(len(self.buckets))
        n = self.ids[word] = len(self.ids)
        return n


_VOCABULARIES: dict[int, _Vocabulary] = {}


def _vocabulary(dims: int) -> _Vocabulary:
    found = _VOCABULARIES.get(dims)
    return _VOCABULARIES.setdefault(dims, _Vocabulary(dims)) if found is None else found


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
    return vec * _length(vec)


def _length(unit: npt.NDArray[np.float64]) -> float:
    """The length an unnormalised model gives a unit vector: between 0.5 and 2, by content."""
    digest = hashlib.blake2b(unit.tobytes(), digest_size=2).digest()
    return 0.5 + 1.5 * int.from_bytes(digest, "big") / 65535
