"""Shared fixtures: the real corpus (skipped with a reason where ../shared is absent), a real
emulator over HTTP, and job files written into tmp_path."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.emulator.server import Emulator, EmulatorOptions

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("EMBEDPIPE_CORPUS", REPO.parent / "shared" / "corpus"))


@dataclass(frozen=True)
class CorpusFile:
    path: str
    mime: str
    pages: int | None
    duration_s: float | None
    expected: str
    also: tuple[str, ...]
    notes: str

    @property
    def file(self) -> Path:
        return CORPUS / self.path

    def accepts(self, outcome: str) -> bool:
        return outcome == self.expected or outcome in self.also


def load_manifest() -> list[CorpusFile]:
    with open(CORPUS / "MANIFEST.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [CorpusFile(r["path"], r["mime"], int(r["pages"]) if r["pages"] else None,
                       float(r["duration_s"]) if r["duration_s"] else None, r["expected"],
                       tuple(a for a in r["also_acceptable"].split(",") if a), r["notes"])
            for r in rows]


@pytest.fixture(scope="session")
def corpus() -> list[CorpusFile]:
    if not (CORPUS / "MANIFEST.tsv").is_file():
        pytest.skip(f"the shared corpus is not at {CORPUS} (it ships beside the repo in CI; "
                    "set EMBEDPIPE_CORPUS to point elsewhere)")
    return load_manifest()


@pytest.fixture(scope="session")
def corpus_dir(corpus: list[CorpusFile]) -> Path:
    return CORPUS


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    with Emulator(EmulatorOptions()) as emu:
        yield emu


@pytest.fixture()
def keyed_emulator(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    auth = getattr(request, "param", "any")
    with Emulator(EmulatorOptions(api_key="test-key-123", auth=auth)) as emu:
        yield emu


def copy_corpus_files(corpus_dir: Path, names: list[str], dest: Path) -> list[Path]:
    out = []
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpus_dir / name, target)
        out.append(target)
    return out


def write_job(folder: Path, root: Path, *, name: str = "t", embed: dict | None = None,
              extra: dict | None = None) -> Path:
    job = {
        "name": name,
        "source": {"kind": "local", "root": str(root)},
        "embed": embed or {"provider": "emulator", "model": "gemini-embedding-2",
                           "output_dimensionality": 256},
        "sink": {"kind": "lance", "uri": str(folder / "lance")},
        **(extra or {}),
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path
