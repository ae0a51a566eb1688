"""The allocator settings a run's process takes (pipeline/memory.py), and that a user's own
win. In subprocesses: they are process-wide."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, pyarrow as pa
from pipeline.memory import _glibc, release_free_memory, tune_for_long_run
tune_for_long_run()
release_free_memory()
print(json.dumps({"pool": pa.default_memory_pool().backend_name, "glibc": _glibc() is not None}))
"""


def _probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ARROW_DEFAULT_MEMORY_POOL", "MALLOC_ARENA_MAX")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, check=True,
                         capture_output=True, text=True)
    import json

    return json.loads(out.stdout)


def test_a_run_process_allocates_arrow_memory_from_the_system_allocator() -> None:
    assert _probe()["pool"] == "system"


def test_the_users_own_arrow_pool_wins() -> None:
    assert _probe(ARROW_DEFAULT_MEMORY_POOL="mimalloc")["pool"] == "mimalloc"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_glibc_is_found_on_linux() -> None:
    assert _probe()["glibc"] is True
