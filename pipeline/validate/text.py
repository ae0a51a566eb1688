"""Text files: decode with charset detection, then cut into chunks under the token limit.

Chunks are measured with a conservative estimate (one token per 3 UTF-8 bytes, see
:func:`pipeline.models.conservative_text_tokens`) so a chunk never exceeds the model's limit
whatever the real tokenizer does. Cuts prefer paragraph, line, sentence and word boundaries.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator

from charset_normalizer import from_bytes

from pipeline.errors import ItemRejected, RejectReason
from pipeline.validate.sniff import bom_encoding, utf16_without_bom

BYTES_PER_TOKEN = 3
_BREAKS = ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ")
# A guess is trusted when the detector recognised a language in the decoded text, or when a
# multi-byte East Asian encoding decoded it into East Asian script: short Latin-1 texts
# otherwise come out as CJK ("Caf\xe9" reads as UTF-16BE "䍡曩").
MIN_COHERENCE = 0.2
_MULTIBYTE = frozenset({"cp932", "shift_jis", "euc_jp", "iso2022_jp", "gb18030", "gb2312", "gbk",
                        "big5", "big5hkscs", "cp950", "euc_kr", "cp949", "johab", "hz"})
# Tried in order when no guess is trusted, if every byte is printable there.
LEGACY_FALLBACKS = ("cp1252", "latin-1")


def decode_text(data: bytes) -> str:
    """A byte-order mark's encoding (UTF-8/16/32), UTF-16 told by its zero bytes, UTF-8 (the
    common case), a trusted charset guess, else cp1252 / latin-1 when they read every byte as
    printable text, else the detector's best guess."""
    encoding = bom_encoding(data) or utf16_without_bom(data[:4096])
    if encoding is not None:
        return data.decode(encoding, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    results = [m for m in from_bytes(data[:1_000_000])
               if m.encoding and not m.encoding.startswith(("utf_16", "utf_32"))]
    for match in results[:1]:
        text = str(match)
        if match.coherence >= MIN_COHERENCE or (match.encoding in _MULTIBYTE
                                                and _east_asian_share(text) >= 0.3):
            return data.decode(match.encoding, errors="replace")
    for legacy in LEGACY_FALLBACKS:
        try:
            text = data.decode(legacy)
        except UnicodeDecodeError:
            continue
        if all(c.isprintable() or c in "\t\r\n\f\v" for c in text):
            return text
    if not results:
        raise ItemRejected(RejectReason.CORRUPT, "not decodable as text in any known encoding")
    return data.decode(results[0].encoding, errors="replace")


def _east_asian_share(text: str) -> float:
    wide = sum(1 for c in text if unicodedata.east_asian_width(c) in ("W", "F"))
    return wide / max(1, len(text.strip()))


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
    if len(text) * 4 <= budget:  # whole at 4 UTF-8 bytes a character: most texts, at once
        if text:
            yield 0, len(text)
        return
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
