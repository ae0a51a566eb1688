"""The emulator as Google's stand-in: request shapes, limits and error bodies, over real HTTP."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipeline.emulator.server import Emulator

URL = "/v1beta/models/gemini-embedding-2:batchEmbedContents"


def _req(parts: list[dict], model: str = "models/gemini-embedding-2", **kw) -> dict:
    return {"model": model, "content": {"parts": parts}, **kw}


def _inline(mime: str, data: bytes) -> dict:
    return {"inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode()}}


def _post(emu: Emulator, body: dict, path: str = URL) -> httpx.Response:
    return httpx.post(emu.base_url + path, json=body, timeout=30)


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}
    return body["error"]


def test_vectors_are_deterministic_normalised_and_text_similar(emulator: Emulator):
    texts = ["how to cook pasta", "cooking pasta at home", "stellar spectroscopy"]
    body = {"requests": [_req([{"text": t}], outputDimensionality=768) for t in texts]}
    first = _post(emulator, body).json()
    again = _post(emulator, body).json()
    assert first["embeddings"] == again["embeddings"]
    v = [np.array(e["values"]) for e in first["embeddings"]]
    assert all(x.shape == (768,) and abs(np.linalg.norm(x) - 1) < 1e-6 for x in v)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    usage = first["usageMetadata"]
    assert usage["promptTokenCount"] == sum(d["tokenCount"] for d in usage["promptTokenDetails"])


@pytest.mark.parametrize("model", ["gemini-embedding-2", "gemini-embedding-001"])
def test_many_requests_at_once_get_each_the_vector_of_the_request_alone(
        model: str, monkeypatch: pytest.MonkeyPatch):
    """request_vectors (one bincount over a chunk of texts, a vocabulary of numbered words) is
    what batch calls and Batch API jobs answer with: each vector bit for bit request_vector's,
    at every size and shape, across chunks and across the vocabulary starting again."""
    from pipeline.emulator import vectors
    from pipeline.emulator.checks import ParsedRequest
    from pipeline.models import MODELS

    monkeypatch.setattr(vectors, "_VOCABULARIES", {})
    monkeypatch.setattr(vectors, "ROWS_VALUES", 1 << 10)  # chunks of 8 rows at 128 dimensions
    spec = MODELS[model]
    texts = [f"Note {n}: rivers and {n * 7} stones, stone on stone" for n in range(40)]
    texts += ["", "!!! ???", "Ünïcödé wörds 東京", "repeat repeat REPEAT", "x" * 3000]
    requests = [ParsedRequest(parts=[t], dims=dims, task_type=None)
                for dims in (128, 768, 3072) for t in texts]
    requests += [ParsedRequest(parts=["a caption", b"\x89PNG bytes"], dims=128, task_type=None),
                 ParsedRequest(parts=[b"bytes alone"], dims=128, task_type=None)]
    alone = [vectors.request_vector(r, spec) for r in requests]
    vectors._vocabulary(128).limit = 20  # starts again mid-way through the 128-dimension texts
    together = vectors.request_vectors(requests, spec)
    assert len(together) == len(alone)
    for one, many in zip(alone, together, strict=True):
        assert many.dtype == np.float32 and one.tobytes() == many.tobytes()
    # a first chunk without a word: nothing in the vocabulary yet
    monkeypatch.setattr(vectors, "_VOCABULARIES", {})
    wordless = [ParsedRequest(parts=[t], dims=128, task_type=None) for t in ("!!!", "? ?")]
    assert [v.tobytes() for v in vectors.request_vectors(wordless, spec)] == [
        vectors.request_vector(r, spec).tobytes() for r in wordless]


@pytest.mark.parametrize(("model", "digest"), [
    ("gemini-embedding-2", "acfabab237ad340bac434186fe28ef1a10c4b40fbd7696bf2c4e0341fe97b681"),
    ("gemini-embedding-001", "dc7b9b996c0894bf036f1e081cc9bb08b256659fbdabe8a1af0888046f5f30d2"),
])
def test_the_emulators_vectors_stay_what_they_were(model: str, digest: str):
    """The vectors of a few texts, as the emulator made them on 2026-12-07 (190f7f5): a change
    to its hashing would make tables embedded against an earlier emulator disagree with new
    queries; made faster, it must make the same bits."""
    import hashlib

    from pipeline.emulator import vectors
    from pipeline.emulator.checks import ParsedRequest
    from pipeline.models import MODELS

    texts = ("Note 12345: rivers and stones", "ünï 東京", "!!!")
    requests = [ParsedRequest(parts=[t], dims=128, task_type=None) for t in texts]
    made = b"".join(v.tobytes() for v in vectors.request_vectors(requests, MODELS[model]))
    assert hashlib.sha256(made).hexdigest() == digest


def test_embed_content_and_v1_snake_case(emulator: Emulator):
    one = _post(emulator, {"content": {"parts": [{"text": "x"}]}, "output_dimensionality": 128},
                "/v1/models/gemini-embedding-2:embedContent")
    assert one.status_code == 200 and len(one.json()["embedding"]["values"]) == 128


def test_gemini_embedding_001_is_unnormalised_below_3072(emulator: Emulator):
    body = {"requests": [_req([{"text": "hello there"}], model="models/gemini-embedding-001",
                              outputDimensionality=768)]}
    resp = httpx.post(emulator.base_url + "/v1beta/models/gemini-embedding-001:batchEmbedContents",
                      json=body)
    norm = np.linalg.norm(resp.json()["embeddings"][0]["values"])
    assert abs(norm - 1) > 1e-3


@pytest.mark.parametrize(("body", "message"), [
    ({"requests": [_req([{"text": "x"}])] * 101}, "at most 100 requests"),
    ({"requests": [_req([{"text": "x"}], model="models/gemini-embedding-001")]}, "Model mismatch"),
    ({"requests": [_req([{"inlineData": {"mimeType": "image/png", "data": "@@@"}}])]},
     "Base64 decoding failed"),
    ({"requests": [_req([_inline("image/gif", b"GIF89a")])]}, "Unsupported MIME type"),
    ({"requests": [_req([{"text": "word " * 9000}])]}, "exceeds the maximum number of tokens"),
    ({"requests": [_req([{"text": "x"}], outputDimensionality=5000)]}, "outputDimensionality"),
    ({"requests": [_req([])]}, "contents is not specified"),
])
def test_invalid_requests_get_googles_400(emulator: Emulator, body: dict, message: str):
    resp = _post(emulator, body)
    assert resp.status_code == 400
    err = _error(resp)
    assert err["status"] == "INVALID_ARGUMENT" and err["code"] == 400
    assert message in err["message"]


def test_media_limits(emulator: Emulator, corpus_dir: Path):
    png = (corpus_dir / "image/smile.png").read_bytes()
    seven = _post(emulator, {"requests": [_req([_inline("image/png", png)] * 7)]})
    assert seven.status_code == 400 and "At most 6 images" in _error(seven)["message"]
    six = _post(emulator, {"requests": [_req([_inline("image/png", png)] * 6)]})
    assert six.status_code == 200 and six.json()["usageMetadata"]["promptTokenCount"] == 6 * 258
    pdf = (corpus_dir / "pdf/Seige_of_Vicksburg_Sample_OCR-crazyones-merged.pdf").read_bytes()
    seven_pages = _post(emulator, {"requests": [_req([_inline("application/pdf", pdf)])]})
    assert seven_pages.status_code == 400 and "7 pages" in _error(seven_pages)["message"]
    song = (corpus_dir / "audio/asc-machine_wars.mp3").read_bytes()
    long_audio = _post(emulator, {"requests": [_req([_inline("audio/mpeg", song)])]})
    assert long_audio.status_code == 400 and "180 s" in _error(long_audio)["message"]
    clip = (corpus_dir / "video/one-by-one-person-detection.mp4").read_bytes()
    long_video = _post(emulator, {"requests": [_req([_inline("video/mp4", clip)])]})
    assert long_video.status_code == 400 and "120 s" in _error(long_video)["message"]


def test_url_safe_unpadded_base64_is_accepted_as_google_does(emulator: Emulator, corpus_dir: Path):
    png = (corpus_dir / "image/smile.png").read_bytes()
    data = base64.urlsafe_b64encode(png).decode().rstrip("=")
    resp = _post(emulator, {"requests": [_req([{"inline_data": {"mime_type": "image/png",
                                                                 "data": data}}])]})
    assert resp.status_code == 200, resp.text


def test_unknown_model_is_404(emulator: Emulator):
    resp = httpx.post(emulator.base_url + "/v1beta/models/text-nope:batchEmbedContents",
                      json={"requests": [_req([{"text": "x"}], model="models/text-nope")]})
    assert resp.status_code == 404 and _error(resp)["status"] == "NOT_FOUND"


def test_stats_endpoint_counts_what_was_served():
    with Emulator() as emu:
        _post(emu, {"requests": [_req([{"text": "a b c"}])] * 3})
        _post(emu, {"requests": [_req([{"text": "x"}])] * 101})
        stats = httpx.get(emu.base_url + "/emulator/stats").json()
        assert stats["batch_calls"] == 1 and stats["items"] == 3
        assert stats["by_status"] == {"200": 1, "400": 1}
        assert stats["tokens"] == 3 * 2
        logged = httpx.get(emu.base_url + "/emulator/requests").json()
        assert len(logged) == 2 and logged[0]["method"] == "batchEmbedContents"
        httpx.post(emu.base_url + "/emulator/reset")
        assert httpx.get(emu.base_url + "/emulator/stats").json()["http_requests"] == 0
