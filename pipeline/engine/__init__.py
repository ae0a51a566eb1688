"""Engines drive the stages of :mod:`pipeline.stages`: they decide what runs where (threads,
tasks, processes, a cluster), how records travel between stages and how the per-file deadline
is enforced. They hold no stage logic.

- :mod:`pipeline.engine.local`: one process, bounded anyio streams, worker threads.
"""
