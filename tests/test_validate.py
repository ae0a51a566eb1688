"""The validator over real files: the corpus rows it handles today, and text chunking."""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pypdf import PdfReader

from pipeline.config import JobConfig
from pipeline.models import conservative_text_tokens
from pipeline.records import Item, Reject, SourceObject
from pipeline.validate import Validator, measure, media
from pipeline.validate.sniff import sniff
from pipeline.validate.text import chunk_spans
from tests.conftest import REPO, CorpusFile


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


# The MANIFEST's notion of "unsupported" (anything but PDF, PNG, JPEG, MP3, WAV, OGG, FLAC, M4A,
# MP4, MOV) matches these policies; the defaults convert more (tested below).
MANIFEST_POLICY = {"image_policy": "reject", "video_policy": "reject",
                   "audio_convert_from": ["audio/ogg", "audio/flac", "audio/mp4"]}


def _check_coverage(row: CorpusFile, items: list[Item]) -> None:
    """Parts are consecutive and cover the file: every page once, or the decodable duration."""
    if row.pages is not None:
        covered = [p for i in items for p in range(i.span.page_start or 0, (i.span.page_end or 0) + 1)]
        assert covered == list(range(1, row.pages + 1)), row.path
        return
    spans = [(i.span.time_start_s, i.span.time_end_s) for i in items]
    assert all(a is not None and b is not None for a, b in spans), row.path
    assert spans[0][0] == 0.0
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert abs((end or 0) - (start or 0)) < 1e-6, row.path
    limit = 180 if items[0].modality == "audio" else 120
    assert all((b or 0) - (a or 0) <= limit for a, b in spans), row.path
    assert row.duration_s is not None and abs((spans[-1][1] or 0) - row.duration_s) < 1.5, row.path


def test_every_corpus_file_gets_its_expected_outcome(corpus: list[CorpusFile]):
    job = _job(**MANIFEST_POLICY)
    wrong = []
    for row in corpus:
        if row.pages is not None and row.pages > 120:
            continue  # the 300-1,158 page books are split in the end-to-end run and the benchmark
        results = fit(row.file, row.path, job)
        got = outcome(results)
        items = [r for r in results if isinstance(r, Item)]
        if row.expected == "too_long" and got == "split":
            got = "too_long"  # under the default split policy: segments covering the duration
        if not row.accepts(got):
            wrong.append(f"{row.path}: expected {row.expected} (or {row.also}), got {got}")
            continue
        if got in ("split", "too_long"):
            _check_coverage(row, items)
        for r in results:
            if isinstance(r, Reject):
                assert r.message.startswith(row.path + ": ") and len(r.message) > len(row.path) + 10
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("name", "mime"), [
    ("bad/example.gif", "image/png"), ("bad/smile.tiff", "image/png"),
    ("bad/example.bmp", "image/png"), ("bad/11k-1ch-2s-silence.aif", "audio/mpeg"),
    ("bad/silence-1.wma", "audio/mpeg"), ("bad/asl-again.mkv", "video/mp4"),
])
def test_default_policy_converts_what_decodes(corpus_dir: Path, name: str, mime: str):
    (item,) = fit(corpus_dir / name)
    assert isinstance(item, Item) and item.mime == mime and item.source_mime != mime


_CONVERT_PINNED = """
import hashlib, os, sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from tests.test_validate import fit
if sys.argv[3] == "one-cpu":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
print(hashlib.sha256(b"".join(i.parts[0].data for i in fit(Path(sys.argv[1])))).hexdigest())
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux's CPU affinity")
def test_a_converted_video_is_the_same_bytes_whatever_cpus_the_process_sees(corpus_dir: Path):
    """The same file must give the same item on any worker (else another vector: a Ray worker,
    a smaller node, a pinned process). x264 picked its thread count from the CPUs it saw."""
    repo = str(REPO)
    digests = {cpus: subprocess.run(
        [sys.executable, "-c", _CONVERT_PINNED, str(corpus_dir / "bad/earth.avi"), repo, cpus],
        capture_output=True, text=True, check=True, timeout=120).stdout.strip()
        for cpus in ("all", "one-cpu")}
    assert len(digests["all"]) == 64 and digests["all"] == digests["one-cpu"]


def test_a_split_pdf_is_the_same_bytes_in_every_process(corpus_dir: Path):
    """Parts are content: their bytes make the content key. qpdf gave each saved part a new
    trailer /ID per process, so a second run (or a Ray worker) re-embedded every split PDF."""
    repo = str(REPO)
    digests = {subprocess.run(
        [sys.executable, "-c", _CONVERT_PINNED, str(corpus_dir / "pdf/tracemonkey.pdf"), repo,
         "all"], capture_output=True, text=True, check=True, timeout=120).stdout.strip()
        for _ in range(2)}
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_the_same_frames_encode_to_the_same_bytes_every_time(corpus_dir: Path):
    """x264's lookahead gave other bytes from the same frames in about one encode in four of
    this file, in one process with one thread: twelve encodes must agree."""
    with measure.open_container((corpus_dir / "bad/Megamind_bugy.avi").read_bytes()) as container:
        stream = measure.real_video_streams(container)[0]
        frames = list(container.decode(stream))
        rate = stream.average_rate  # while it is open (PyAV 18.1.1 refuses it after)

    def encode() -> bytes:
        writer = media._H264Writer(frames[0].width, frames[0].height, rate, 720)
        for frame in frames:
            writer.write(frame)
        return writer.close(0.0, 9.0).data

    digests = {hashlib.sha256(encode()).hexdigest() for _ in range(12)}
    assert len(frames) == 270 and len(digests) == 1


_CONVERT_THEN_FORK = """
import subprocess, sys, threading
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from tests.test_validate import fit
done, leave = threading.Event(), threading.Event()
def convert():  # as a validation worker thread does, and stays alive
    assert fit(Path(sys.argv[1]))[0].mime == "video/mp4"
    done.set()
    leave.wait()
worker = threading.Thread(target=convert)
worker.start()
done.wait()
# As Ray starts its daemons: the child runs Python (a preexec_fn) before it execs.
print("exec'd", subprocess.run(["true"], preexec_fn=lambda: None).returncode)
leave.set()
"""


def test_a_process_that_converted_video_can_still_fork(corpus_dir: Path):
    """PyAV 18.1.1 keeps a frame scaler per thread, with slice threads of its own by default;
    a forked child frees the other threads' scalers and waited forever for their slice threads
    (Ray's cluster never started in a process that had validated a video)."""
    repo = str(REPO)
    proc = subprocess.Popen([sys.executable, "-c", _CONVERT_THEN_FORK,
                             str(corpus_dir / "bad/earth.avi"), repo],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its forked child in its process group
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and its child stuck before exec
        proc.communicate()
        pytest.fail("the child forked after a video conversion never exec'd")
    assert proc.returncode == 0 and out.strip() == "exec'd 0", err[-2000:]


def test_reject_policies_and_too_long_reject(corpus_dir: Path):
    job = _job(image_policy="reject", audio_policy="reject", too_long="reject")
    assert outcome(fit(corpus_dir / "bad/example.gif", job=job)) == "unsupported"
    assert outcome(fit(corpus_dir / "audio/rain.mp3", job=job)) == "ok"
    assert outcome(fit(corpus_dir / "audio/silence-44-s.flac", job=job)) == "unsupported"
    (reject,) = fit(corpus_dir / "audio/asc-machine_wars.mp3", job=job)
    assert isinstance(reject, Reject) and reject.reason == "too_long" and "180 s" in reject.message
    (reject,) = fit(corpus_dir / "video/one-by-one-person-detection.mp4", job=job)
    assert isinstance(reject, Reject) and reject.reason == "too_long"


def test_media_limits_are_configurable(corpus_dir: Path):
    items = fit(corpus_dir / "audio/rain.mp3", job=_job(audio_max_s=25))
    assert len(items) == 3 and all(isinstance(i, Item) for i in items)
    spans = [(i.span.time_start_s, i.span.time_end_s) for i in items if isinstance(i, Item)]
    assert spans[-1][1] == pytest.approx(60.46, abs=0.1)


def test_header_that_lies_is_judged_by_what_decodes(corpus_dir: Path):
    (reject,) = fit(corpus_dir / "bad/variable-block.flac")
    assert isinstance(reject, Reject) and reject.reason == "corrupt"
    assert "header claims 261.7 s" in reject.message


def test_exif_orientation_is_applied_when_converting(tmp_path: Path):
    from PIL import Image

    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "photo.webp"
    img.save(path, format="WEBP", exif=exif.tobytes())
    (item,) = fit(path)
    assert isinstance(item, Item) and item.mime == "image/png"
    import io
    assert Image.open(io.BytesIO(item.parts[0].data or b"")).size == (20, 40)


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


def test_qpdf_and_pypdf_split_alike_and_judge_alike(corpus: list[CorpusFile],
                                                   monkeypatch: pytest.MonkeyPatch):
    """Every corpus PDF: the same outcome, the same parts with the same pages, whether qpdf
    (pikepdf) or pypdf (the fallback, and the splitter where pikepdf is missing) does it."""
    import io

    import pipeline.validate.pdf as pdf

    pdfs = [row for row in corpus if row.path.endswith(".pdf")]
    assert len(pdfs) > 20
    with_qpdf = {row.path: fit(row.file, row.path) for row in pdfs}
    assert any(pdf._qpdf_open(row.file.read_bytes()) is not False for row in pdfs)
    monkeypatch.setattr(pdf, "_qpdf_open", lambda data, by_header=False: False)
    for row in pdfs:
        plain = fit(row.file, row.path)
        assert outcome(plain) == outcome(with_qpdf[row.path]), row.path
        spans = [(i.span.page_start, i.span.page_end) for i in plain if isinstance(i, Item)]
        assert spans == [(i.span.page_start, i.span.page_end)
                         for i in with_qpdf[row.path] if isinstance(i, Item)], row.path
        for item in with_qpdf[row.path]:
            if isinstance(item, Item):  # what the API (and the emulator) reads: pypdf's count
                pages = len(PdfReader(io.BytesIO(item.parts[0].data or b"")).pages)
                assert pages == item.span.page_end - item.span.page_start + 1, row.path


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


# One head for each signature sniff_bytes knows, as a file of that kind begins.
SIGNATURES = [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff\xe0\x00\x10JFIF", b"GIF89a\x01\x00",
    b"GIF87a\x01\x00", b"BM" + bytes(30), b"II*\x00\x08\x00", b"MM\x00*\x00\x08",
    b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom", b"\x00\x00\x00\x20ftypheic",
    b"\x00\x00\x00\x1cftypavif", b"\x00\x00\x00\x14ftypqt  ", b"\x00\x00\x00\x1cftypM4A ",
    b"\x00\x00\x01\x00moov", b"\x00\x00\x00\x08mdat", b"\x00\x00\x00\x08wide",
    b"\x00\x00\x00\x08free", b"\x00\x00\x00\x08skip", b"RIFF\x24\x00\x00\x00WAVEfmt ",
    b"RIFF\x24\x00\x00\x00WEBPVP8 ", b"RIFF\x24\x00\x00\x00AVI LIST", b"RIFX\x00\x00\x00\x00WAVE",
    b"FORM\x00\x00\x00\x00AIFF", b"FORM\x00\x00\x00\x00AIFC", b"OggS\x00\x02", b"fLaC\x00\x00",
    b"\x1a\x45\xdf\xa3\x9fB\x86\x81\x01webm", b"\x1a\x45\xdf\xa3\x9fB\x86matroska", b"MThd\x00\x00",
    bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c"), b"IMPMsong", b"wvpk\x00\x00",
    b"PK\x03\x04\x14\x00", b"\x1f\x8b\x08\x00", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07",
    b"ID3\x04\x00", b"\xff\xfb\x90\x64", b"\xff\xf1\x50\x80", b"%PDF-1.7\n",
    b"junk before the marker\n%PDF-1.4\n", b"hello world", b"# Notes\n\nsome text",
]


def test_the_sniffing_shortcut_agrees_with_every_signature(corpus: list[CorpusFile]):
    """sniff_bytes lets a head through with two tests when its first byte begins no signature
    and bytes 4-8 name no ISO box: it must say what trying every signature says, on every
    corpus file, on every known signature, and on random heads of every first byte."""
    from pipeline.validate.sniff import _signature, sniff_bytes
    heads = [f.file.read_bytes()[:4096] for f in corpus if f.file.is_file()]
    heads += SIGNATURES + [s[:n] for s in SIGNATURES for n in range(1, len(s))]
    rng = __import__("random").Random(7)
    heads += [bytes([first]) + rng.randbytes(rng.choice((3, 7, 15, 63)))
              for first in range(256) for _ in range(40)]
    heads += [rng.randbytes(4) + box + rng.randbytes(8) for box in
              (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip") for _ in range(20)]
    known = {_signature(h) for h in SIGNATURES}
    assert len(known) >= 24  # the list above reaches the signatures it is meant to
    disagree = [h[:16] for h in heads if sniff_bytes(h) != _signature(h)]
    assert not disagree


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
    assert list(chunk_spans("", 100, 10)) == []


@pytest.mark.parametrize("char", ["a", "é", "語", "😀"])
def test_a_text_near_the_limit_is_cut_where_the_general_rule_cuts(char: str):
    """A text short enough to fit at 4 bytes a character is taken whole at once: around that
    length, the spans are those the byte-measuring rule gives."""
    from pipeline.validate.text import _break_at, _fit
    budget = 100 * 3  # 100 tokens at 3 bytes each
    for n in range(60, 320):
        text = ("word " * 80)[:n // 2] + char * (n - n // 2)
        spans, start = [], 0
        while start < len(text):  # the general rule, without overlap
            end = _break_at(text, start, _fit(text, start, budget))
            spans.append((start, end))
            start = end
        assert list(chunk_spans(text, 100, 0)) == spans, n


@pytest.mark.parametrize(("content", "name", "reason"), [
    (b"", "empty.txt", "empty"), (b"   \n\t ", "blank.md", "empty"),
    (b"", "empty.jpg", "empty"), (b"", "empty.pdf", "empty"),
    (b"just some text", "fake.pdf", "corrupt"),
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


def test_suffix_and_stem_match_pathlib():
    from pathlib import PurePosixPath

    from pipeline.validate.sniff import stem, suffix

    for key in ["a.txt", "dir/a.TXT", ".bashrc", "a.", "a..b", "dir.d/file", "x/.hidden.md",
                "noext", "a.tar.gz", "x/y/z.PDF", "a/..b"]:
        assert suffix(key) == PurePosixPath(key).suffix.lower(), key
        assert stem(key) == PurePosixPath(key).stem, key


@pytest.mark.parametrize(("data", "text"), [
    ("Grüße aus Köln\n".encode("utf-16"), "Grüße aus Köln\n"),  # UTF-16 LE with its BOM
    (b"\xfe\xff" + "Grüße aus Köln\n".encode("utf-16-be"), "Grüße aus Köln\n"),
    ("Grüße aus Köln\n".encode("utf-32"), "Grüße aus Köln\n"),
    ("\ufeffGrüße aus Köln\n".encode("utf-8"), "Grüße aus Köln\n"),
    ("Grüße aus Köln, no mark\n".encode("utf-16-le"), "Grüße aus Köln, no mark\n"),
    ("Grüße aus Köln, no mark\n".encode("utf-16-be"), "Grüße aus Köln, no mark\n"),
    (b"Caf\xe9", "Café"),  # 4 bytes: a charset guess would read CJK
    ("Grüße".encode("cp1252"), "Grüße"),
    ("Price: 5\u20ac \u2013 \u201cquoted\u201d".encode("cp1252"),
     "Price: 5\u20ac \u2013 \u201cquoted\u201d"),  # euro sign, en dash, curly quotes
    ("Привет, как дела? Это текст на русском языке.".encode("cp1251"),
     "Привет, как дела? Это текст на русском языке."),
    ("これは日本語のテキストです。東京は大きな都市です。".encode("shift_jis"),
     "これは日本語のテキストです。東京は大きな都市です。"),
], ids=["utf16le-bom", "utf16be-bom", "utf32-bom", "utf8-bom", "utf16le", "utf16be",
        "cafe-latin1", "short-cp1252", "cp1252-punctuation", "cp1251", "shift-jis"])
def test_text_that_is_text_is_read_as_text(tmp_path: Path, data: bytes, text: str):
    path = tmp_path / "note.txt"
    path.write_bytes(data)
    (item,) = fit(path)
    assert isinstance(item, Item) and item.text == text and item.modality == "text"


def test_html_is_embedded_as_its_visible_text_with_its_title(tmp_path: Path):
    path = tmp_path / "page.html"
    path.write_text("""<!doctype html><html><head><title> Sourdough   basics </title>
        <style>body { color: red }</style><script>track("visit")</script></head>
        <body><h1>Starter</h1><p>Feed it <b>daily</b>.</p><!-- note to self -->
        <ul><li>flour</li><li>water</li></ul></body></html>""", encoding="utf-8")
    (item,) = fit(path)
    assert isinstance(item, Item) and item.mime == "text/html"
    assert item.text == "Starter\nFeed it daily.\nflour\nwater"
    assert item.title == "Sourdough basics"


def test_xml_is_read_without_resolving_entities(tmp_path: Path):
    path = tmp_path / "feed.xml"
    path.write_bytes(b'<?xml version="1.0" encoding="ISO-8859-1"?>\n'
                     b'<!DOCTYPE rss [<!ENTITY x SYSTEM "file:///etc/hostname">]>\n'
                     b"<rss><channel><title>Caf\xe9 news</title><item><description>"
                     b"Open &x; today</description></item></channel></rss>")
    (item,) = fit(path)
    assert isinstance(item, Item) and item.title == "Café news"
    assert item.text is not None and "Café news" in item.text and "Open" in item.text
    assert Path("/etc/hostname").read_text().strip() not in item.text.replace("Open", "")


def test_media_read_from_disk_give_the_items_they_give_in_memory(
        corpus: list[CorpusFile], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A large object is spooled to a file and read by position, never held whole: every
    corpus media file (and its bad ones) must come out the same either way, and every file the
    validator was given is closed when its items end."""
    import connectors.blob as blob_module
    from connectors.blob import Blob

    media_rows = [row for row in corpus if row.mime.startswith(("audio/", "video/"))]
    assert len(media_rows) > 20
    monkeypatch.setattr(blob_module, "SPOOL_BYTES", 0)  # everything goes to disk
    validator = Validator(_job())
    for row in media_rows:
        data = row.file.read_bytes()
        obj = SourceObject(row.file.as_uri(), row.path, len(data), datetime.now(UTC), "v1")
        blob = Blob.spool(iter([data[:1000], data[1000:]]), len(data))
        assert not blob.in_memory and blob.size == len(data) and blob.head(16) == data[:16]
        on_disk = list(validator.fit(obj, blob))
        assert blob._file is not None and blob._file.closed, row.path
        in_memory = list(validator.fit(obj, data))
        assert outcome(on_disk) == outcome(in_memory), row.path
        assert [(i.span, [p.data for p in i.parts]) for i in on_disk if isinstance(i, Item)] == [
            (i.span, [p.data for p in i.parts]) for i in in_memory if isinstance(i, Item)], row.path


def test_blob_readers_keep_their_own_place(tmp_path: Path):
    """PyAV and mutagen read one blob at once: a reader's seek must not move another's."""
    from connectors.blob import Blob

    data = bytes(range(256)) * 4096
    (tmp_path / "f").write_bytes(data)
    with Blob.file_at((tmp_path / "f").open("rb"), len(data)) as blob:
        a, b = blob.open(), blob.open()
        a.seek(1000)
        assert b.read(10) == data[:10] and a.read(10) == data[1000:1010]
        b.seek(-5, os.SEEK_END)
        assert b.read() == data[-5:] and a.read(3) == data[1010:1013]
        assert blob.read() == data and blob.sha256() == hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="closed blob"):
        blob.head()
