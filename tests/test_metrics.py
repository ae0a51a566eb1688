"""``run.metrics_textfile``: the run's figures in Prometheus text format, written atomically at
the end of every run, that node_exporter's textfile collector can read."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.commands.sample_files import make_text_corpus
from pipeline.config import load_job
from pipeline.metrics import prometheus_text
from pipeline.run import EXIT_OK, run_job
from tests.conftest import write_job

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)+)\} (\S+)$')


def _parse(text: str) -> dict[tuple[str, str], float]:
    """name + labels -> value; every line a comment or a well-formed sample."""
    out: dict[tuple[str, str], float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        assert m.group(1) in typed, f"{m.group(1)} has no TYPE line before it"
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def test_a_run_writes_its_figures_for_the_textfile_collector(tmp_path: Path):
    src = tmp_path / "src"
    make_text_corpus(src, 20)
    (src / "empty.txt").write_bytes(b"")
    prom = tmp_path / "textfile" / "embedpipe-nightly.prom"
    job = write_job(tmp_path, src, name="nightly",
                    extra={"run": {"metrics_textfile": str(prom), "report": str(tmp_path / "r.json")}})
    result = run_job(load_job(job))
    assert result.exit_code == EXIT_OK
    report = json.loads((tmp_path / "r.json").read_text())
    samples = _parse(prom.read_text(encoding="utf-8"))
    job_label = 'job="nightly"'
    assert samples[("embedpipe_last_run_success", job_label)] == 1
    assert samples[("embedpipe_last_run_exit_code", job_label)] == EXIT_OK
    assert samples[("embedpipe_last_run_items_embedded", job_label)] == 20
    assert samples[("embedpipe_last_run_files", job_label + ',kind="seen"')] == 21
    assert samples[("embedpipe_last_run_rejects", job_label + ',reason="empty"')] == 1
    assert samples[("embedpipe_last_run_tokens", job_label)] == report["tokens"]
    assert abs(samples[("embedpipe_last_run_end_timestamp_seconds", job_label)]
               - report["finished"]) < 1e-3
    assert [p.name for p in prom.parent.iterdir()] == [prom.name]  # no temporary file left


def test_label_values_are_escaped():
    text = prometheus_text({"job": 'a "b"\\c', "exit_code": 3,
                            "reject_reasons": {'x"y': 2}})
    samples = _parse(text)
    assert samples[("embedpipe_last_run_success", 'job="a \\"b\\"\\\\c"')] == 0
    assert ("embedpipe_last_run_rejects", 'job="a \\"b\\"\\\\c",reason="x\\"y"') in samples
