"""The command line as a new user meets it: help that teaches, a version, options where the
user puts them, machine-readable output, and usage errors that exit 2 with one line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser, main
from pipeline.commands.sample_files import make_text_corpus
from pipeline.emulator.server import Emulator
from pipeline.outcome import EXIT_OK, EXIT_USAGE
from tests.conftest import write_job


def _cli(*args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, **({"COLUMNS": str(columns)} if columns else {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_help_describes_the_tool_and_lists_every_exit_code(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as ended:
        main(["--help"])
    assert ended.value.code == 0
    text = capsys.readouterr().out
    assert "The ``embedpipe`` command." not in text
    assert "Gemini embeddings stored in" in text
    for code in ("0", "1", "2", "3", "4", "5", "6", "130"):
        assert f"\n  {code} " in text, code


def test_every_argument_of_every_command_has_help_and_each_command_an_example():
    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        assert sub.epilog and "embedpipe " + name in sub.epilog, name
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest}"


def test_version(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as ended:
        main(["--version"])
    assert ended.value.code == 0
    assert capsys.readouterr().out.startswith("embedpipe 0.")


@pytest.mark.parametrize("line", [
    ["run", "job.yaml", "-v", "--log-format", "json"],
    ["-v", "--log-format", "json", "run", "job.yaml"],
    ["--log-format", "json", "run", "-v", "job.yaml"],
])
def test_global_options_work_before_or_after_the_command(line: list[str]):
    args = build_parser().parse_args(line)
    assert (args.verbose, args.log_format, args.job) == (True, "json", "job.yaml")


def test_defaults_without_global_options():
    args = build_parser().parse_args(["status", "job.yaml"])
    assert (args.verbose, args.log_format) == (False, "text")


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory, emulator: Emulator) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    make_text_corpus(folder / "src", 12)
    job = write_job(folder, folder / "src", embed={
        "provider": "gemini", "api_key": "any-key", "base_url": emulator.base_url,
        "model": "gemini-embedding-2", "output_dimensionality": 128, "mode": "interactive"})
    assert main(["run", "-q", str(job)]) == EXIT_OK
    return job


@pytest.mark.parametrize("k", ["0", "-3", "many"])
def test_a_bad_k_is_a_usage_error_in_one_line(ran: Path, k: str):
    done = _cli("search", str(ran), "harbour", "-k", k)
    assert done.returncode == EXIT_USAGE
    assert "Traceback" not in done.stderr and "argument -k" in done.stderr


def test_search_json_is_one_json_array(ran: Path):
    done = _cli("search", str(ran), "harbour", "-k", "3", "--json")
    assert done.returncode == EXIT_OK, done.stderr
    hits = json.loads(done.stdout)
    assert len(hits) == 3 and {"uri", "score", "text", "where"} <= set(hits[0])


def test_a_where_on_a_missing_column_is_a_usage_error(ran: Path):
    done = _cli("search", str(ran), "harbour", "--where", "yeer > 2000")
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "--where" in done.stderr and "run failed" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3 and "Traceback" not in done.stderr


@pytest.mark.parametrize("sink", ["lance", "parquet"])
def test_a_search_before_any_run_is_a_usage_error_and_costs_no_call(tmp_path: Path,
                                                                  emulator: Emulator, sink: str):
    make_text_corpus(tmp_path / "src", 2)
    job = write_job(tmp_path, tmp_path / "src", embed={
        "provider": "gemini", "api_key": "any-key", "base_url": emulator.base_url,
        "model": "gemini-embedding-2", "output_dimensionality": 128})
    if sink == "parquet":
        job.write_text(job.read_text().replace(
            "kind: lance", "kind: arrow\n  format: parquet").replace("uri:", "path:"))
    calls = emulator.state.stats.http_requests
    done = _cli("search", str(job), "harbour")
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "has not run yet" in done.stderr and "run failed" not in done.stderr
    assert emulator.state.stats.http_requests == calls


@pytest.mark.parametrize("texts", ["0", "-5"])
def test_samples_refuses_a_count_that_is_not_positive(tmp_path: Path, texts: str):
    done = _cli("samples", str(tmp_path / "out"), "--texts", texts)
    assert done.returncode == EXIT_USAGE
    assert not (tmp_path / "out").exists()


def test_samples_into_an_unwritable_place_is_one_line_not_a_traceback(tmp_path: Path):
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    done = _cli("samples", str(tmp_path / "a-file" / "sub"), "--texts", "3")
    assert done.returncode == EXIT_USAGE
    assert "Traceback" not in done.stderr and "cannot write samples" in done.stderr


def test_json_logs_are_json_only_and_name_the_job_and_run(tmp_path: Path):
    make_text_corpus(tmp_path / "src", 30)
    job = write_job(tmp_path, tmp_path / "src", name="nightly",
                    extra={"run": {"flush_rows": 10}})
    done = _cli("run", str(job), "-v", "--log-format", "json")
    assert done.returncode == EXIT_OK, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert lines and all({"ts", "level", "event", "job", "run_id"} <= set(x) for x in lines)
    assert {x["job"] for x in lines} == {"nightly"}
    run_ids = {x["run_id"] for x in lines}
    assert len(run_ids) == 1 and None not in run_ids
    events = [x["event"] for x in lines]
    for stage in ("listing done", "validation done", "first embedding call", "committed"):
        assert any(e.startswith(stage) for e in events), (stage, events)
    assert events[-1] == "run ended" and lines[-1]["items_embedded"] == 30
    assert "files seen" not in done.stderr  # the human summary is for text mode only


@pytest.mark.parametrize("line", [
    ["--log-format", "json", "status"],  # a missing argument
    ["status", "job.yaml", "--log-format=json", "--bogus"],  # an unknown option
    ["--log-format", "json", "search", "job.yaml", "q", "-k", "0"],  # a bad value
])
def test_usage_errors_are_one_json_line_in_json_mode(line: list[str]):
    done = _cli(*line)
    assert done.returncode == EXIT_USAGE
    (record,) = [json.loads(x) for x in done.stderr.splitlines()]
    assert record["level"] == "error" and record["usage"].startswith("usage: embedpipe")


def test_rays_own_warnings_go_through_the_json_log(capsys: pytest.CaptureFixture[str]):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    import logging

    from pipeline.commands.common import JSON_LOGS, setup_logging
    from pipeline.engine.ray import import_ray

    ray_log = logging.getLogger("ray")
    before = (list(ray_log.handlers), ray_log.propagate, ray_log.level)
    setup_logging("json", verbose=False)
    try:
        import_ray()
        logging.getLogger("ray._private.authentication").warning("token auth is disabled")
        logging.getLogger("ray._private.worker").info("not shown below warning level")
    finally:
        JSON_LOGS["on"] = False
        logging.basicConfig(force=True)
        ray_log.handlers[:], ray_log.propagate, ray_log.level = before
    (record,) = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert record["event"] == "token auth is disabled" and record["level"] == "warning"


def test_progress_while_listing_shows_no_none():
    from rich.console import Console

    from pipeline.commands.run import progress_display
    from pipeline.stats import RunStats

    progress, update = progress_display(Console(record=True, width=120), True)
    assert progress is not None and update is not None
    stats = RunStats(run_id="r", files_seen=7, files_new=4, files_done=1)
    update(stats)
    task = progress.tasks[0]
    assert "None" not in task.fields["files"] and "7 listed" in task.fields["files"]
    stats.listing_done = True
    update(stats)
    assert progress.tasks[0].fields["files"] == "1/4 files"


def test_the_emulator_on_a_busy_port_says_so_without_claiming_to_serve(emulator: Emulator):
    port = emulator.base_url.rsplit(":", 1)[1]
    done = _cli("emulator", "--port", port)
    assert done.returncode == EXIT_USAGE
    assert "emulator on" not in done.stdout + done.stderr
    assert "cannot listen" in done.stderr and "Traceback" not in done.stderr


def test_the_package_and_readme_cite_no_file_a_user_does_not_have():
    """Facts (limits, prices) live in the package and cite Google's pages; only the tests use
    the shared corpus beside the repo."""
    from tests.conftest import REPO

    code = [*(REPO / "pipeline").rglob("*.py"), *(REPO / "connectors").rglob("*.py"),
            *(REPO / "jobs").rglob("*.yaml")]
    for path in [REPO / "README.md", *code]:
        assert "GEMINI_API.md" not in path.read_text(encoding="utf-8"), path
    for path in code:
        assert "../shared" not in path.read_text(encoding="utf-8"), path


def test_plan_says_where_its_prices_come_from(ran: Path):
    done = _cli("plan", str(ran), "--json")
    assert done.returncode == EXIT_OK, done.stderr
    source = json.loads(done.stdout)["prices_source"]
    assert "list prices as of 20" in source and "https://ai.google.dev/" in source


@pytest.mark.parametrize("command", [["status"], ["search", "{job}", "harbour", "-k", "3"]])
def test_status_and_search_fit_80_columns_with_whole_headers(ran: Path, command: list[str]):
    args = [a.replace("{job}", str(ran)) for a in command]
    if args == ["status"]:
        args = ["status", str(ran)]
    done = _cli(*args, columns=80)
    assert done.returncode == EXIT_OK, done.stderr
    lines = done.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, done.stdout
    header = next(line for line in lines if line.startswith("┃"))
    assert "…" not in header, header
    wide = _cli(*args, "--wide", columns=80)
    assert max(len(line) for line in wide.stdout.splitlines()) > 80  # everything, unsqueezed


def test_set_overrides_a_job_key_checked_like_the_file(tmp_path: Path):
    from pipeline.config import load_job
    from pipeline.config.loading import parse_overrides

    make_text_corpus(tmp_path / "src", 2)
    job = write_job(tmp_path, tmp_path / "src")
    loaded = load_job(job, overrides=parse_overrides(
        ["embed.concurrency=8", "run.flush_rows=500", "run.engine=local"]))
    assert (loaded.embed.concurrency, loaded.run.flush_rows) == (8, 500)
    bad = _cli("run", str(job), "--set", "embed.concurrency=0")
    assert bad.returncode == EXIT_USAGE and "embed.concurrency" in bad.stderr
    typo = _cli("run", str(job), "--set", "embed.concurency=8")
    assert typo.returncode == EXIT_USAGE and "did you mean 'concurrency'" in typo.stderr
    shape = _cli("plan", str(job), "--set", "concurrency")
    assert shape.returncode == EXIT_USAGE and "KEY.PATH=VALUE" in shape.stderr
    plan = _cli("plan", str(job), "--json", "--set", "embed.model=gemini-embedding-001")
    assert plan.returncode == EXIT_OK, plan.stderr
    assert json.loads(plan.stdout)["model"] == "gemini-embedding-001"


@pytest.mark.parametrize("sink", ["lance", "parquet"])
def test_rejects_lists_each_with_its_message_and_fix(tmp_path: Path, sink: str):
    src = tmp_path / "src"
    make_text_corpus(src, 3)
    (src / "empty.txt").write_bytes(b"")
    (src / "blob.bin").write_bytes(bytes(range(256)) * 8)
    job = write_job(tmp_path, src)
    if sink == "parquet":
        job.write_text(job.read_text().replace(
            "kind: lance", "kind: arrow\n  format: parquet").replace("uri:", "path:"))
    before = _cli("rejects", str(job))
    assert before.returncode == EXIT_USAGE and "has not run yet" in before.stderr
    assert main(["run", "-q", str(job)]) == 0  # rejects are a night done
    done = _cli("rejects", str(job), "--json")
    assert done.returncode == EXIT_OK, done.stderr
    rows = json.loads(done.stdout)
    assert sorted((r["key"], r["reason"]) for r in rows) == [
        ("blob.bin", "unsupported"), ("empty.txt", "empty")]
    assert all(r["message"] and r["fix"] for r in rows)
    only = json.loads(_cli("rejects", str(job), "--json", "--reason", "empty").stdout)
    assert [r["key"] for r in only] == ["empty.txt"]
    text = _cli("rejects", str(job), columns=80)
    assert max(len(line) for line in text.stdout.splitlines()) <= 80, text.stdout
    assert "unsupported (1): a type the model does not take" in text.stdout
    bad = _cli("rejects", str(job), "--reason", "broken")
    assert bad.returncode == EXIT_USAGE and "not a reject reason" in bad.stderr


def test_init_writes_a_commented_job_that_loads_and_plans(tmp_path: Path):
    from pipeline.commands.sample_files import make_quickstart_media

    src = tmp_path / "archive"
    make_text_corpus(src / "notes", 5)
    make_quickstart_media(src / "media")
    (src / "blob.bin").write_bytes(b"\x00" * 10)
    out = tmp_path / "jobs" / "archive.yaml"
    done = _cli("init", str(src), "--out", str(out))
    assert done.returncode == EXIT_OK, done.stderr
    text = out.read_text(encoding="utf-8")
    assert 'name: "archive"' in text and "${GEMINI_API_KEY}" in text
    assert "# Found" in text and "5 text" in text and "pdf" in text and "image" in text
    assert "1 files of other types" in text
    plan = _cli("plan", str(out), "--json")
    assert plan.returncode == EXIT_OK, plan.stderr
    assert json.loads(plan.stdout)["files"]["new"] >= 7
    again = _cli("init", str(src), "--out", str(out))
    assert again.returncode == EXIT_USAGE and "--force" in again.stderr
    assert _cli("init", str(tmp_path / "nowhere")).returncode == EXIT_USAGE


def test_init_for_a_bucket_it_cannot_reach_still_writes_a_valid_job(tmp_path: Path):
    import os

    out = tmp_path / "b.yaml"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "init", "s3://photos/2026/",
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                               "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    assert done.returncode == EXIT_OK, done.stderr
    text = out.read_text(encoding="utf-8")
    assert "kind: s3" in text and "bucket: photos" in text and "The listing failed" in text
    assert "AWS_SECRET" not in text and "\ns\n" not in text
