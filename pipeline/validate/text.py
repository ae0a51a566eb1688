"""Text files: decode with charset detection, then cut into chunks under the token limit.

Chunks are measured with a conservative estimate (one token per 3 UTF-8 bytes, see
:func:`pipeline.models.conservative_text_tokens`) so a chunk never exceeds the model's limit
whatever the real tokenizer does. Cuts prefer paragraph, line, sentence and word boundaries.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

from charset_normalizer import from_bytes

from pipeline.errors import ItemRejected, RejectReason

BYTES_PER_TOKEN = 3
PREFERRED_LEGACY = "cp1252"
_BREAKS = ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ")

_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def decode_text(data: bytes) -> str:
    """UTF-8 (the common case, checked first), a BOM's encoding, else charset detection."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    results = from_bytes(data[:1_000_000])
    best = results.best()
    if best is None or best.encoding is None:
        raise ItemRejected(RejectReason.CORRUPT, "not decodable as text in any known encoding")
    encoding = best.encoding
    # Short texts often fit several code pages equally well: prefer the most common one.
    tied = {m.encoding for m in results
            if m.chaos == best.chaos and m.coherence == best.coherence}
    if PREFERRED_LEGACY in tied:
        encoding = PREFERRED_LEGACY
    return data.decode(encoding, errors="replace")


def _fit(text: str, start: int, budget: int) -> int:
    """The largest end such that text[start:end] is at most ``budget`` UTF-8 bytes."""
    end = min(len(text), start + budget)
    while end > start:
        size = len(text[start:end].encode("utf-8"))
        if size <= budget:
            return end
        end -= max(1, (size - budget) // 4)
    return start + 1


def _break_at(text: str, start: int, end: int) -> int:
    """Move ``end`` back to a natural boundary, searching only the last 30 % of the chunk."""
    if end >= len(text):
        return end
    floor = start + (end - start) * 7 // 10
    for sep in _BREAKS:
        pos = text.rfind(sep, floor, end)
        if pos != -1:
            return pos + len(sep)
    return end


def chunk_spans(text: str, max_tokens: int, overlap_tokens: int) -> Iterator[tuple[int, int]]:
    """Character ranges [start, end) covering ``text``, each within ``max_tokens``."""
    budget = max_tokens * BYTES_PER_TOKEN
    overlap = min(overlap_tokens * BYTES_PER_TOKEN, budget // 2)
    start = 0
    while start < len(text):
        end = _break_at(text, start, _fit(text, start, budget))
        yield start, end
        if end >= len(text):
            return
        nxt = end - overlap if overlap else end
        if overlap:
            space = text.find(" ", nxt, end)
            nxt = space + 1 if space != -1 else nxt
        start = max(nxt, start + 1)
