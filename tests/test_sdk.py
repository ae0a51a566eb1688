"""The official google-genai SDK, pointed at the emulator: a client we did not write must work.

Each SDK call runs in a subprocess: the SDK's async client is known to hang on a second event
loop in one process (see ../shared/GEMINI_API.md), and a subprocess also proves the emulator
is reached over real HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.emulator.server import Emulator

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
