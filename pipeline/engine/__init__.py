"""Engines drive the stages of :mod:`pipeline.stages`: they decide what runs where (threads,
tasks, processes, a cluster), how records travel between stages and how the per-file deadline
is enforced. They hold no stage logic.

- :mod:`pipeline.engine.local`: one process, bounded anyio streams, worker threads.
- :mod:`pipeline.engine.ray`: the same streams on the driver, validation and calls on a Ray
  cluster; imported only by a run that uses it (importing it costs ~0.45 CPU-s).
"""

import os


def ray_wanted(engine: str) -> bool:
    """Whether a run with ``run.engine: engine`` uses Ray (``auto``: when RAY_ADDRESS names a
    cluster)."""
    return engine == "ray" or (engine == "auto" and bool(os.environ.get("RAY_ADDRESS")))
