"""The validator over real files: the corpus rows it handles today, and text chunking."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pypdf import PdfReader

from pipeline.config import JobConfig
from pipeline.models import conservative_text_tokens
from pipeline.records import Item, Reject, SourceObject
from pipeline.validate import Validator
from pipeline.validate.sniff import sniff
from pipeline.validate.text import chunk_spans
from tests.conftest import CorpusFile


def _job(**validate: object) -> JobConfig:
    return JobConfig.model_validate({
        "name": "t", "source": {"kind": "local", "root": "/"},
        "embed": {"provider": "emulator", "model": "gemini-embedding-2"},
        "sink": {"kind": "lance", "uri": "/tmp/unused"}, "validate": validate})


def fit(path: Path, key: str | None = None, job: JobConfig | None = None) -> list[Item | Reject]:
    obj = SourceObject(path.as_uri(), key or path.name, path.stat().st_size,
                       datetime.now(UTC), "v1")
    return list(Validator(job or _job()).fit(obj, path.read_bytes()))


def outcome(results: list[Item | Reject]) -> str:
    rejects = [r for r in results if isinstance(r, Reject)]
    if rejects:
        return rejects[0].reason
    return "split" if len(results) > 1 else "ok"


def _documents_and_images(corpus: list[CorpusFile]) -> list[CorpusFile]:
    media = ("audio/", "video/", "application/ogg")
    return [c for c in corpus if not c.mime.startswith(media) and not c.path.startswith(
        ("audio/", "video/")) and c.path.rsplit(".", 1)[-1].lower() not in
        {"mp3", "mp4", "wav", "flac", "m4a", "m4b", "mov", "webm", "mkv", "avi", "ogg", "wma",
         "mid", "aif", "it"}]


def test_pdfs_images_and_bad_files_get_their_expected_outcome(corpus: list[CorpusFile]):
    wrong = []
    for row in _documents_and_images(corpus):
        results = fit(row.file, row.path)
        got = outcome(results)
        if not row.accepts(got):
            wrong.append(f"{row.path}: expected {row.expected} (or {row.also}), got {got}")
        for r in results:
            if isinstance(r, Reject):
                assert r.message.startswith(row.path + ": ") and len(r.message) > len(row.path) + 10
    assert not wrong, "\n".join(wrong)


def test_split_parts_cover_every_page_once_and_are_standalone(corpus: list[CorpusFile]):
    import io

    for row in corpus:
        if row.expected != "split" or row.pages is None or row.pages > 120:
            continue
        items = fit(row.file, row.path)
        assert all(isinstance(i, Item) for i in items), row.path
        spans = [(i.span.page_start, i.span.page_end) for i in items if isinstance(i, Item)]
        covered = [p for a, b in spans for p in range(a, b + 1)]
        assert covered == list(range(1, row.pages + 1)), row.path
        assert all(b - a + 1 <= 6 for a, b in spans)
        for item in items:
            assert isinstance(item, Item) and item.part_count == len(items)
            pages = len(PdfReader(io.BytesIO(item.parts[0].data or b"")).pages)
            assert pages == item.span.page_end - item.span.page_start + 1


def test_six_pages_is_not_split_seven_is(corpus_dir: Path):
    assert outcome(fit(corpus_dir / "pdf/imagemagick-images.pdf")) == "ok"
    seven = fit(corpus_dir / "pdf/Seige_of_Vicksburg_Sample_OCR-crazyones-merged.pdf")
    assert [(i.span.page_start, i.span.page_end) for i in seven if isinstance(i, Item)] == [
        (1, 6), (7, 7)]


def test_page_limit_is_configurable(corpus_dir: Path):
    items = fit(corpus_dir / "pdf/pdflatex-4-pages.pdf", job=_job(pdf_max_pages=2))
    assert [(i.span.page_start, i.span.page_end) for i in items if isinstance(i, Item)] == [
        (1, 2), (3, 4)]


def test_jpeg_named_png_is_embedded_as_jpeg(corpus_dir: Path):
    (item,) = fit(corpus_dir / "bad/this-is-a-jpeg.png")
    assert isinstance(item, Item) and item.mime == "image/jpeg"


def test_encrypted_with_empty_password_is_processed(corpus_dir: Path):
    (item,) = fit(corpus_dir / "bad/r4-owner-password.pdf")
    assert isinstance(item, Item)
    assert not PdfReader(__import__("io").BytesIO(item.parts[0].data or b"")).is_encrypted


def test_sniff_ignores_extensions():
    assert sniff(b"%PDF-1.7\n", "x.txt") == "application/pdf"
    assert sniff(b"\xff\xd8\xff\xe0", "x.png") == "image/jpeg"
    assert sniff(b"hello world", "notes.md") == "text/markdown"
    assert sniff(b"\x00\x01\x02binary", "x.txt") == "application/octet-stream"


def test_text_is_chunked_under_the_limit_with_overlap(tmp_path: Path):
    text = "".join(f"Paragraph {i}. " + "word " * 300 + "\n\n" for i in range(40)) + "é" * 3000
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    items = fit(path, job=_job(text_max_tokens=1000, text_overlap_tokens=50))
    assert len(items) > 5 and all(isinstance(i, Item) for i in items)
    spans = [(i.span.char_start, i.span.char_end) for i in items if isinstance(i, Item)]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (a1, b1), (a2, b2) in itertools.pairwise(spans):
        assert a1 < a2 <= b1 < b2  # progress, overlap, no gap
    for item in items:
        assert isinstance(item, Item) and item.text == text[item.span.char_start:item.span.char_end]
        assert conservative_text_tokens(item.text) <= 1000


def test_chunk_spans_short_text_is_one_chunk():
    assert list(chunk_spans("short", 100, 10)) == [(0, 5)]


@pytest.mark.parametrize(("content", "name", "reason"), [
    (b"", "empty.txt", "empty"), (b"   \n\t ", "blank.md", "empty"),
    (b"", "empty.jpg", "corrupt"), (b"just some text", "fake.pdf", "corrupt"),
])
def test_empty_and_mismatched_files(tmp_path: Path, content: bytes, name: str, reason: str):
    path = tmp_path / name
    path.write_bytes(content)
    assert outcome(fit(path)) == reason


def test_latin1_text_is_decoded(tmp_path: Path):
    path = tmp_path / "latin.txt"
    path.write_bytes("Crème brûlée à la française, très bien.".encode("latin-1"))
    (item,) = fit(path)
    assert isinstance(item, Item) and item.text is not None and "brûlée" in item.text
