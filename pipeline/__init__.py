"""embedpipe's Python API, for orchestrators (Airflow, Dagster, a script):

    from pipeline import load_job, plan_job, run_job

    job = load_job("jobs/nightly.yaml", overrides={("embed", "concurrency"): 8})
    figures = plan_job(job)            # dict: what `embedpipe plan --json` prints
    result = run_job(job)              # RunResult: .exit_code, .stats, .report (the JSON report)
    history = run_history(job)         # History: .runs (the last 30, oldest first), .rejects

Errors are typed (:mod:`pipeline.errors`: ``ConfigError``, ``PipelineError``; ``JobLocked``;
``NotRunYet``, a ``ConfigError``, from ``run_history`` before the job's first run),
never ``SystemExit``. Names are imported on first use, so ``import pipeline`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "History", "JobLocked", "NotRunYet", "PipelineError", "RunResult",
           "load_job", "plan_job", "run_history", "run_job"]


def plan_job(job: Any, *, retry_rejects: bool = False,
             allow_mass_delete: bool = False) -> dict[str, Any]:
    """What a run of ``job`` would do and cost, with no API call: the figures of
    ``embedpipe plan --json``."""
    from pipeline.commands.planner import make_plan

    return make_plan(job, retry_rejects=retry_rejects,
                     allow_mass_delete=allow_mass_delete).as_dict(job)


def __getattr__(name: str) -> Any:
    if name == "load_job":
        from pipeline.config import load_job

        return load_job
    if name in ("run_job", "RunResult"):
        from pipeline import run

        return getattr(run, name)
    if name in ("run_history", "History"):
        from pipeline.commands import history

        return getattr(history, name)
    if name in ("ConfigError", "PipelineError", "NotRunYet"):
        from pipeline import errors

        return getattr(errors, name)
    if name == "JobLocked":
        from pipeline.state.lock import JobLocked

        return JobLocked
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
