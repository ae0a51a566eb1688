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
        self.starts = np.zeros(1 << 12, dtype=np.int64)  # word n: starts[n]:starts[n + 1]
        self.buckets = np.empty(1 << 15, dtype=np.int64)
        self.weights = np.empty(1 << 15, dtype=np.float64)

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
            starts = self.starts[ids]
            lengths = self.starts[ids + 1] - starts
            ends = np.concatenate(([0], np.cumsum(lengths)))  # features before word n
            at = np.arange(ends[-1], dtype=np.int64) + np.repeat(starts - ends[:-1], lengths)
            counts = np.diff(ends[np.cumsum(per_text)], prepend=0)
            return self.buckets[at], self.weights[at], counts

    def _add(self, word: str) -> int:
        n = self.ids.get(word)
        if n is not None:  # twice in one text
            return n
        buckets, weights = _word_features(word, self.dims)
        n = len(self.ids)
        start = int(self.starts[n])
        end = start + len(buckets)
        if n + 2 > len(self.starts):
            self.starts = np.resize(self.starts, 2 * len(self.starts))
        if end > len(self.buckets):
            size = max(2 * len(self.buckets), end)
            self.buckets = np.resize(self.buckets, size)
            self.weights = np.resize(self.weights, size)
        self.buckets[start:end] = buckets
        self.weights[start:end] = weights
        self.starts[n + 1] = end
        self.ids[word] = n
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
