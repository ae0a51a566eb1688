"""The job file's JSON Schema and the job and CLI references are generated from the code: the
shipped copies must be what the code generates now, the schema must take every job the
project ships and refuse what a run refuses."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from pipeline.cli import build_parser
from pipeline.commands.reference import cli_reference
from pipeline.config import load_job
from pipeline.config.reference import SCHEMA_FILE, job_reference, job_schema, job_schema_text
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = ("regenerate with: embedpipe schema > pipeline/config/job.schema.json; "
              "embedpipe schema --markdown job > docs/job-reference.md; "
              "embedpipe schema --markdown cli > docs/cli-reference.md")


@pytest.mark.parametrize(("shipped", "make"), [
    (SCHEMA_FILE, job_schema_text),
    (ROOT / "docs" / "job-reference.md", job_reference),
    (ROOT / "docs" / "cli-reference.md", cli_reference),
], ids=["schema", "job-reference", "cli-reference"])
def test_the_shipped_references_are_what_the_code_says(shipped: Path, make: Any):
    assert shipped.read_text(encoding="utf-8") == make(), f"{shipped.name} is out of date: {REGENERATE}"


def test_embedpipe_schema_prints_the_shipped_schema():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "schema"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert json.loads(out) == json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def _validator() -> Draft202012Validator:
    schema = job_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _jobs() -> list[Path]:
    jobs = sorted((ROOT / "jobs").glob("*.yaml"))
    assert jobs, "no job files in jobs/"
    return jobs


@pytest.mark.parametrize("path", _jobs(), ids=lambda p: p.name)
def test_the_schema_takes_every_shipped_job(path: Path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [e.message for e in _validator().iter_errors(data)]
    assert errors == []


def _job(**sections: Any) -> dict[str, Any]:
    return {"name": "j", "source": {"kind": "local", "root": "src"},
            "embed": {"provider": "emulator"}, "sink": {"kind": "lance", "uri": "out"},
            **sections}


@pytest.mark.parametrize("job", [
    _job(),
    _job(embed={"provider": "gemini", "api_key": "${GEMINI_API_KEY}", "batch_api": False,
                "reuse_from": ["../other/lance", {"uri": "s3://b/t", "table": "v"}],
                "batch": {"modalities": ["text"]}, "prices": {"text": 0.15}}),
    _job(sink={"kind": "arrow", "path": "out", "format": "ipc"},
         source={"kind": "s3", "bucket": "corpus", "prefix": "a/", "endpoint_url": "http://h:1"},
         validate={"pdf_max_pages": 3}, run={"engine": "ray", "report": None}),
], ids=["minimal", "gemini", "arrow-s3"])
def test_the_schema_takes_what_a_run_takes(job: dict[str, Any], tmp_path: Path):
    assert [e.message for e in _validator().iter_errors(job)] == []
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    load_job(path, env={"GEMINI_API_KEY": "k"})  # and so does the loader


@pytest.mark.parametrize(("change", "why"), [
    (lambda j: j["embed"].update(concurency=8), "concurency"),  # a typo'd key
    (lambda j: j.update(sinks=j.pop("sink")), "sinks"),
    (lambda j: j["embed"].update(output_dimensionality=7), "7"),
    (lambda j: j["sink"].update(kind="parquet"), "parquet"),
    (lambda j: j["run"].update(engine="spark"), "spark"),
    (lambda j: j.pop("source"), "source"),
], ids=["typo-embed", "typo-top", "bounds", "unknown-kind", "enum", "missing"])
def test_the_schema_refuses_what_a_run_refuses(change: Any, why: str, tmp_path: Path):
    job = copy.deepcopy(_job(run={}))
    change(job)
    errors = [e.message for e in _validator().iter_errors(job)]
    assert errors and any(why in m for m in errors), errors
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    with pytest.raises(ConfigError):
        load_job(path)


def test_every_job_key_has_a_description_in_the_reference():
    schema = job_schema()
    missing = [f"{name}.{key}" for name, model in {"JobConfig": schema, **schema["$defs"]}.items()
               for key, prop in model.get("properties", {}).items() if not prop.get("description")]
    assert missing == []
    page = job_reference()
    for model in schema["$defs"].values():
        for key in model.get("properties", {}):
            assert f"| `{key}` |" in page


def test_every_command_and_option_is_in_the_cli_reference():
    page = cli_reference()
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    assert commands.choices
    for name, command in commands.choices.items():  # type: ignore[union-attr]
        assert f"## `embedpipe {name}`" in page
        for action in command._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help", "--log-format", "-v", "--verbose", "-q", "--quiet"):
                    assert f"`{flag}" in page, (name, flag)


def test_every_page_the_readme_and_the_docs_link_to_is_there():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    linked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            linked += 1
            assert (page.parent / target).exists(), f"{page.name} links to {target}, not there"
    assert linked >= 10
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 250
    for page in sorted((ROOT / "docs").glob("*.md")):  # every page is reachable from the README
        assert f"docs/{page.name}" in readme, page.name
