"""The official google-genai SDK, pointed at the emulator: a client we did not write must work.

Each SDK call runs in a subprocess: the SDK's async client is known to hang on a second event
loop in one process (seen with SDK 3.4), and a subprocess also proves the emulator
is reached over real HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.emulator.server import Emulator, EmulatorOptions

pytest.importorskip("google.genai", reason="google-genai is a dev dependency")

SCRIPT = """
import json, sys
from google import genai
from google.genai import types
model, as_contents = sys.argv[2], sys.argv[3] == "contents"
texts = ["how to cook pasta", "cooking pasta at home", "stellar spectroscopy"]
contents = [types.Content(parts=[types.Part(text=t)]) for t in texts] if as_contents else texts
client = genai.Client(api_key="sdk-key", http_options=types.HttpOptions(base_url=sys.argv[1]))
result = client.models.embed_content(
    model=model, contents=contents, config=types.EmbedContentConfig(output_dimensionality=768))
print(json.dumps([e.values for e in result.embeddings]))
"""


def _sdk(emulator: Emulator, model: str, form: str) -> list[list[float]]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, emulator.base_url, model, form],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("model", "form"), [("gemini-embedding-001", "strings"),
                                             ("gemini-embedding-2", "contents")])
def test_google_genai_sdk_embeds_a_list_of_texts(emulator: Emulator, model: str, form: str):
    before = emulator.state.stats.items
    vectors = _sdk(emulator, model, form)
    assert len(vectors) == 3 and all(len(v) == 768 for v in vectors)
    assert _dot(vectors[0], vectors[1]) > _dot(vectors[0], vectors[2])
    assert emulator.state.stats.items - before == 3


def test_sdk_list_of_strings_for_gemini_embedding_2_is_one_aggregated_content(emulator: Emulator):
    """The SDK sends a list of strings to a multimodal model as the parts of ONE content,
    which the API answers with one aggregated vector; the emulator does the same."""
    assert len(_sdk(emulator, "gemini-embedding-2", "strings")) == 1


BATCH_SCRIPT = """
import io, json, sys, time
from google import genai
from google.genai import types
client = genai.Client(api_key="sdk-key", http_options=types.HttpOptions(base_url=sys.argv[1]))
model = "gemini-embedding-2"
lines = [{"key": f"k{i}", "request": {"content": {"parts": [{"text": t}]},
                                      "outputDimensionality": 256}}
         for i, t in enumerate(["how to cook pasta", "cooking pasta at home", "star spectra"])]
data = "\\n".join(json.dumps(line) for line in lines).encode()
uploaded = client.files.upload(file=io.BytesIO(data), config=types.UploadFileConfig(
    mime_type="application/jsonl", display_name="embed-input"))
from_file = client.batches.create_embeddings(model=model, src={"file_name": uploaded.name})
inline = client.batches.create_embeddings(model=model, src={"inlined_requests": {
    "contents": ["how to cook pasta", "star spectra"],
    "config": {"output_dimensionality": 256}}})
out = {"file_state": str(client.files.get(name=uploaded.name).state)}
for name, job in (("file", from_file), ("inline", inline)):
    for _ in range(100):
        job = client.batches.get(name=job.name)
        if job.state.name.endswith(("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")):
            break
        time.sleep(0.1)
    out[name] = {"state": job.state.name}
    if name == "file":
        raw = client.files.download(file=job.dest.file_name)
        out[name]["lines"] = [json.loads(x) for x in raw.decode().splitlines() if x.strip()]
    else:
        out[name]["vectors"] = [r.response.embedding.values
                                for r in job.dest.inlined_embed_content_responses]
out["listed"] = sorted(j.name for j in client.batches.list())
print(json.dumps(out))
"""


def test_sdk_batch_embeddings_and_files_work_against_the_emulator():
    with Emulator(EmulatorOptions(batch_delay_s=0.4)) as emu:
        proc = subprocess.run([sys.executable, "-W", "ignore", "-c", BATCH_SCRIPT,
                               emu.base_url], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert emu.state.stats.items == 0  # nothing went through the interactive endpoint
        assert emu.state.stats.batch_items == 5 and emu.state.stats.batch_jobs == 2
    assert out["file_state"].endswith("ACTIVE")
    assert out["file"]["state"] == out["inline"]["state"] == "JOB_STATE_SUCCEEDED"
    lines = out["file"]["lines"]
    assert [line["key"] for line in lines] == ["k0", "k1", "k2"]
    vectors = [line["response"]["embedding"]["values"] for line in lines]
    assert all(len(v) == 256 for v in vectors)
    assert _dot(vectors[0], vectors[1]) > _dot(vectors[0], vectors[2])  # pasta near pasta
    inline = out["inline"]["vectors"]
    assert len(inline) == 2 and inline[0] == pytest.approx(vectors[0], abs=1e-6)
    assert len(out["listed"]) == 2
