"""Process-wide memory settings for long runs: what a night over millions of files needs so that
its resident memory follows what it holds, not how much it has done.

A run allocates and frees large transient blocks all night (response bodies, the float lists
they decode to, Arrow batches for each flush) from many threads (the event loop's workers,
Lance's and DuckDB's own). With the allocators' defaults that freed memory mostly stays resident:
glibc gives each thread an arena of its own (up to 8 per core) and keeps what is freed inside
them, and Arrow's mimalloc pool keeps its pages. Measured with ``embedpipe run`` as a process over a
1M-file manifest with 100,000 files changed: 875 MB peak with the defaults, growing all run
long; 626 MB with Arrow on the system allocator, two glibc arenas and the free memory handed
back after each flush. A 10M-file night with 1 % changed: 961 -> 694 MB, 46.6 -> 50.6 s. Since
2026-12-07 a flush hands the heap back at most once a second, unless resident memory grew by
32 MB since the last time: 20,000 texts, ~2.5-4 % less CPU; 1M files with 100,000 changed,
22.6-23.1 s and 665-669 MB before, 22.9 s and 674-686 MB after; 1M texts in Batch API mode,
860 MB before, 799 MB after (handed back only on growth, it had peaked at 1,186 MB).

Each setting yields to the user's own (``ARROW_DEFAULT_MEMORY_POOL``, ``MALLOC_ARENA_MAX``) and
is skipped where the C library is not glibc.

:func:`in_thread` runs blocking work in anyio's worker threads without them keeping it: an idle
worker holds its last job (the function, its arguments, and the future with the result) until
it takes the next one, so a thread that encoded a 16 MB request body, or cut a video segment,
kept it alive for as long as it stayed idle, and the payload budget counted it as held. Over a
256 MB video that was seven request bodies at once with one call in flight.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import sys
import time
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

import anyio

_T = TypeVar("_T")

log = logging.getLogger("embedpipe.memory")

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
ARENAS = 2
# How often a flush hands the C heap's free pages back at most, unless resident memory grew
# by TRIM_MIN_GROWTH since (what a flush frees is mostly used again by the next batches).
TRIM_INTERVAL_S = 1.0
TRIM_MIN_GROWTH = 32 << 20
# Allocations between two collections of the young generation during a run (Python's: 700).
GC_GEN0 = 10_000


@cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
        return libc
    except (OSError, AttributeError):
        return None


def tune_for_long_run() -> None:
    """Call once, early in a process that will run a job (before its worker threads start)."""
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())
    libc = _glibc()
    if (libc is not None and "MALLOC_ARENA_MAX" not in os.environ
            and not libc.mallopt(M_ARENA_MAX, ARENAS)):
        log.debug("mallopt(M_ARENA_MAX) refused")


def freeze_startup_objects(gen0: int = GC_GEN0) -> None:
    """Call once the run's modules are imported and its state is open, before its work: what
    exists then lives as long as the process, so the cyclic collector stops walking it (a full
    collection visited every object of pydantic's, Lance's and DuckDB's imports: ~10 % of the
    CPU of a text run), and collects the young generation less often (``gen0`` allocations
    instead of 700: a run allocates a few records per item, almost none of them in cycles)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _Trims:
    """When the C heap was last handed back, and the resident memory just after."""

    at: float | None = None
    resident: int | None = None


def release_free_memory(min_interval_s: float = TRIM_INTERVAL_S,
                        min_growth: int = TRIM_MIN_GROWTH) -> bool:
    """Hand the C heap's free pages back to the system (after a flush: a few ms), and say
    whether it did: at most once every ``min_interval_s``, unless resident memory grew by
    ``min_growth`` since the last time. What the flushes in between free is mostly used again
    by the next batches, where handing it back after each one had it faulted in again: a run
    of 20,000 texts handed ~30 MB back at each of its 11 flushes (16,000 page faults, ~2.5 %
    of its CPU). Never more rarely than that: in a long run the two arenas' free pages pile
    up (handed back only on growth, a 1M-text Batch API run peaked at 1,186 MB, not 860)."""
    libc = _glibc()
    if libc is None:
        return False
    now = time.monotonic()
    if _Trims.at is not None and now - _Trims.at < min_interval_s:
        resident = resident_bytes()
        if (resident is None or _Trims.resident is None
                or resident - _Trims.resident < min_growth):
            return False
    libc.malloc_trim(0)
    _Trims.at, _Trims.resident = time.monotonic(), resident_bytes()
    return True


async def in_thread(fn: Callable[..., _T], *args: Any, limiter: Any = None,
                    abandon_on_cancel: bool = False) -> _T:
    """``fn(*args)`` in a worker thread, as ``anyio.to_thread.run_sync``, but handed over
    through boxes emptied on both sides: the worker keeps neither the arguments nor the result
    (nor an exception's frames) once the caller has them."""
    job: list[Any] = [fn, args]
    out: list[tuple[bool, Any]] = []

    def call() -> None:
        function, arguments = job
        job.clear()
        try:
            out.append((True, function(*arguments)))
        except BaseException as exc:  # handed to the caller, raised there
            out.append((False, exc))
        finally:
            del function, arguments

    await anyio.to_thread.run_sync(call, limiter=limiter, abandon_on_cancel=abandon_on_cancel)
    ok, value = out.pop()
    if not ok:
        raise value
    result: _T = value
    return result
