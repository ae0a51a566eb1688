"""A run's books, kept on every path out: the upgrade switched in, table upkeep and the
``run-<id>`` tag (a failure of either is a warning: the rows are committed, the night is done),
then the ``runs`` row, the JSON report and the Prometheus textfile. Blocking."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.atomic import write_text_atomic
from pipeline.config import ArrowSinkConfig, JobConfig
from pipeline.errors import PipelineError
from pipeline.metrics import prometheus_text
from pipeline.models import cost_usd
from pipeline.outcome import EXIT_OK, RunOutcome, run_status
from pipeline.sinks.lance import LanceSink, sql_str
from pipeline.state.opened import Opened
from pipeline.state.tables import switch
from pipeline.state.upkeep import compact_state
from pipeline.stats import RunStats

log = logging.getLogger("embedpipe.run")


class Books:
    def __init__(self, job: JobConfig, stats: RunStats, outcome: RunOutcome,
                 state: Opened) -> None:
        self.job = job
        self.stats = stats
        self.outcome = outcome
        self.state = state
        self.engine: str | None = None  # the engine's name, once it is chosen
        self.version_before: int | None = None  # the table's version when the run began
        self.report_path: Path | None = None
        self.final_report: dict[str, Any] = {}  # what report() says at the run's end

    def close(self, code: int) -> None:
        """After the run: switch, tag and upkeep, then the runs row, the JSON report and the
        metrics, each on every path out (one failing does not keep the others from being
        written)."""
        status = run_status(code)
        if self.state.upgrade is not None and code == EXIT_OK and self.stats.listing_done:
            try:
                self._switch()
            except PipelineError as exc:  # the upgrade stays built: the next run switches
                self.outcome.problems.append(f"the upgraded table was not switched in: {exc}")
                log.warning("the upgraded table was not switched in: %s", exc)
        if status in ("finished", "quota", "stopped"):
            try:
                self._upkeep()
            except PipelineError as exc:
                self.stats.upkeep_warnings.append(str(exc))
                log.warning("table upkeep failed after the run's rows were committed (the "
                            "run stands): %s", exc)
            try:
                for done in compact_state(self._state_tables(), self.job.run.keep_days):
                    log.info("state upkeep: %s", done)
            except PipelineError as exc:
                self.stats.upkeep_warnings.append(str(exc))
                log.warning("%s (the run stands)", exc)
        self.final_report = self.report(status, code)  # the run's figures, final: made once
        try:
            self.record(self.final_report)
        finally:
            self._write_report(self.final_report)
            self._write_metrics(self.final_report)

    def record(self, report: dict[str, Any]) -> None:
        """The run's ``runs`` row: its report's figures in the table's columns."""
        finished = report["finished"]
        self.state.runlog.record({
            **report, "started": datetime.fromtimestamp(report["started"], UTC),
            "finished": datetime.fromtimestamp(finished, UTC) if finished else None,
            "reject_reasons": json.dumps(report["reject_reasons"], sort_keys=True),
            "table_version": self.state.sink.version()})

    def report(self, status: str, code: int | None) -> dict[str, Any]:
        """What the run did, as the JSON report holds it (``code`` None while it is under way:
        the ``runs`` row written at its start and after its listing)."""
        return {"job": self.job.name, "status": status, "exit_code": code,
                **self.stats.as_dict(), "cost_usd": self._cost_usd(),
                # what the reused items would have cost to embed, at list prices
                "cost_saved_usd": round(cost_usd(self.stats.tokens_reused_by_modality,
                                                 self.job.embed.price_table()), 6),
                "model": self.job.embed.model, "sink": self.job.sink.uri,
                "engine": self.engine, "problems": self.outcome.problems[:100]}

    def _switch(self) -> None:
        """Every file is in the new table: readers get it in one commit."""
        state = self.state
        assert isinstance(state.sink, LanceSink) and state.upgrade is not None
        left = state.manifest.table.count_rows(
            f"fingerprint != {sql_str(state.space.fingerprint)}")
        if left:  # files not redone (unreadable this time): the upgrade is not complete
            self.outcome.problems.append(f"upgrade not switched in yet: {left:,} files still "
                                         "hold vectors of the old settings")
            return
        state.sink.vectors = switch(state.db, state.tables, self.job.sink.table,
                                    state.sink.vectors, state.space)
        state.sink.mirror = None
        self.stats.upgrade = (f"{state.upgrade.describe_change(state.space)}: done, "
                              f"{self.job.sink.table!r} now holds the new vectors")
        state.upgrade = None
        log.info("upgrade switched in: %s", self.stats.upgrade)

    def _upkeep(self) -> None:
        run, sink = self.job.run, self.state.sink
        changed = sink.version() != self.version_before
        manifest_index = ([] if run.id_index_min_rows is None
                          else self.state.manifest.upkeep(run.id_index_min_rows))
        for done in [*sink.upkeep(run.compact, run.index_min_rows, run.index_type,
                                  run.id_index_min_rows, run.keep_versions - 1, run.keep_days),
                     *manifest_index]:
            log.info("table upkeep: %s", done)
        if changed:  # the version the run leaves (compacted, if it was): the one to name
            sink.tag(f"run-{self.stats.run_id}")

    def _state_tables(self) -> dict[str, Any]:
        """The job's own tables, by name (the rejects live beside a Lance sink only)."""
        state, names = self.state, self.job.sink
        tables = {names.manifest_table: state.manifest.table, names.runs_table: state.runlog.table,
                  names.batches_table: state.batch_log.table}
        if isinstance(state.sink, LanceSink):
            tables[names.rejects_table] = state.sink.rejects
        return tables

    def _write_metrics(self, report: dict[str, Any]) -> None:
        target = self.job.run.metrics_textfile
        if target is None:
            return
        try:
            write_text_atomic(target, prometheus_text(report))
        except OSError as exc:
            log.warning("could not write the metrics textfile %s: %s", target, exc)

    def _cost_usd(self) -> float:
        """What the run's tokens cost at list prices, the Batch API's at half price."""
        prices = self.job.embed.price_table()
        batch_cost = cost_usd(self.stats.tokens_batch_by_modality, prices)
        return round(cost_usd(self.stats.tokens_by_modality, prices) - batch_cost / 2, 6)

    def _write_report(self, report: dict[str, Any]) -> None:
        target = self.job.run.report
        if target is None or (target == "auto" and "://" in self.job.sink.uri):
            return
        # Beside an Arrow sink's data files the folder must stay data only: "_" hides it.
        folder = "_reports" if isinstance(self.job.sink, ArrowSinkConfig) else "reports"
        path = (Path(self.job.sink.uri) / folder / f"{self.stats.run_id}.json"
                if target == "auto" else Path(target))
        try:
            write_text_atomic(path, json.dumps(report, default=str, indent=1))
            self.report_path = path
        except OSError as exc:
            log.warning("could not write the run report to %s: %s", path, exc)
