"""The ``embedpipe`` commands: one module per verb, each owning its arguments (``arguments``),
its work (``main``, which imports what it needs when it runs) and its output. The modules
beside them hold the work of the reading commands (``planner``, ``plan_tables``, ``lookup``,
``history``, ``reject_list``, ``batch_jobs``, ``preflight``, ``scaffold``, ``sample_files``,
``report_page``, ``reference``) and what the output shares (``common``, ``tables``).

A verb module has ``NAME``, ``HELP`` (one line, no full stop), ``EXAMPLE``,
``arguments(parser)`` and ``main(args) -> exit code``; :mod:`pipeline.cli` builds the parser
from :data:`VERBS` and dispatches.
"""

from __future__ import annotations

# In the order `embedpipe --help` lists them.
VERBS = ("run", "plan", "check", "search", "status", "report", "init", "rejects", "batches",
         "emulator", "samples", "schema")
