"""Text shown on a terminal: data (file names, API messages) must not steer it."""

from __future__ import annotations

# Control characters (C0, DEL, C1) as escapes: a file name or an API message must not recolour
# the terminal, set its title or move the cursor.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\x1b``), for a console."""
    return text.translate(_CONTROLS)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 run``, ``2 runs`` (``many`` for words that do not take an s)."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"
