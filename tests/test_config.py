from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import GeminiEmbedConfig, load_job
from pipeline.errors import ConfigError

MINIMAL = """\
name: quickstart
source: {kind: local, root: ./samples, include: ["**/*"]}
embed:  {provider: emulator, model: gemini-embedding-2, output_dimensionality: 768}
sink:   {kind: lance, uri: ./out/quickstart, table: vectors}
"""


def _job(tmp_path: Path, text: str) -> Path:
    (tmp_path / "samples").mkdir(exist_ok=True)
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_shape_loads_and_resolves_paths_against_the_yaml_folder(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    job = load_job(_job(tmp_path, MINIMAL))
    assert job.source.root == tmp_path / "samples"
    assert job.sink.uri == str(tmp_path / "out" / "quickstart")
    assert job.embed.output_dimensionality == 768
    assert job.embed.provider == "emulator"


def test_misspelt_key_names_file_path_and_suggestion(tmp_path):
    path = _job(tmp_path, MINIMAL.replace("model:", "modle:"))
    with pytest.raises(ConfigError) as err:
        load_job(path)
    assert str(err.value) == f"{path}: embed.modle: unknown key (did you mean 'model'?)"


def test_wrong_type_and_bad_tag_are_reported_with_key_paths(tmp_path):
    path = _job(tmp_path, MINIMAL.replace("768", "big").replace("kind: lance", "kind: parquet"))
    with pytest.raises(ConfigError) as err:
        load_job(path)
    text = str(err.value)
    assert "embed.output_dimensionality: Input should be a valid integer" in text
    assert "sink: Input tag 'parquet'" in text


def test_missing_job_file(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")


def test_a_missing_source_folder_loads_and_fails_at_listing(tmp_path):
    # An unmounted share is an outage, not a bad job: the reading commands must still work,
    # and a run fails with exit 3 when it lists (tests/test_night.py).
    from connectors import connector_for
    from pipeline.errors import ConnectorError

    path = tmp_path / "job.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    job = load_job(path)
    with pytest.raises(ConnectorError, match=r"samples does not exist"):
        list(connector_for(job).list())


def test_env_variables_defaults_and_unset(tmp_path):
    text = MINIMAL.replace(
        "embed:  {provider: emulator, model: gemini-embedding-2, output_dimensionality: 768}",
        "embed: {provider: gemini, api_key: '${GEMKEY}', output_dimensionality: 768,"
        " base_url: '${BASE:-http://127.0.0.1:9}', auth: bearer}")
    path = _job(tmp_path, text)
    # plan and status call no API: the job loads without its key; run and search need it
    unset = load_job(path, env={})
    with pytest.raises(ConfigError) as err:
        unset.require_api_key()
    assert str(err.value).startswith(f"{path}: embed.api_key: environment variable GEMKEY")
    with pytest.raises(ConfigError, match=r"embed\.api_key: no key is given"):
        load_job(path, env={"GEMKEY": ""}).require_api_key()
    job = load_job(path, env={"GEMKEY": "s3cr3t-value"})
    job.require_api_key()
    assert isinstance(job.embed, GeminiEmbedConfig)
    assert job.embed.base_url == "http://127.0.0.1:9"
    assert job.embed.api_key is not None
    assert job.embed.api_key.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(job) and "s3cr3t-value" not in str(job.model_dump())


def test_dollar_escape(tmp_path):
    path = _job(tmp_path, MINIMAL.replace("name: quickstart", "name: 'a$$b'"))
    with pytest.raises(ConfigError, match=r"name: String should match pattern"):
        load_job(path, env={})


def test_invalid_yaml_gives_line(tmp_path):
    path = _job(tmp_path, "name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+: invalid YAML"):
        load_job(path)


def test_cli_bad_config_prints_one_line_and_exits_2(tmp_path):
    path = _job(tmp_path, MINIMAL.replace("table: vectors", "tabel: vectors"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "sink.tabel: unknown key (did you mean 'table'?)" in lines[0]
    assert "Traceback" not in proc.stderr


def test_every_example_job_loads():
    jobs = sorted((Path(__file__).parents[1] / "jobs").glob("*.yaml"))
    assert jobs, "no example jobs"
    for path in jobs:
        (path.parent / "samples" / "quickstart").mkdir(parents=True, exist_ok=True)
        job = load_job(path, env={"GEMINI_API_KEY": "x"})
        assert job.name
