"""A file's time limit (``validate.file_timeout_s``) that counts only the time spent on the file:
while its items wait for room downstream (the payload budget, a full queue), its clock stops."""

from __future__ import annotations

import math
import time


class Deadline:
    __slots__ = ("_end", "_paused_at")

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds
        self._paused_at: float | None = None

    @classmethod
    def never(cls) -> Deadline:
        return cls(math.inf)

    def passed(self) -> bool:
        return self._paused_at is None and time.monotonic() > self._end

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = time.monotonic()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._end += time.monotonic() - self._paused_at
            self._paused_at = None
