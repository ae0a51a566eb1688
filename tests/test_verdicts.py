"""The validator's verdict is the API's: whatever it passes, the emulator (standing in for
Google) accepts, both measuring media the same way. Media made by code here (PyAV, Pillow)."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from datetime import UTC, datetime
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from pipeline.config import JobConfig
from pipeline.emulator.checks import ApiFault, parse_request
from pipeline.models import MODELS
from pipeline.records import Item, Reject, SourceObject
from pipeline.validate import Validator
from pipeline.validate.measure import probe

SPEC = MODELS["gemini-embedding-2"]


def _validate(data: bytes, key: str) -> list[Item | Reject]:
    job = JobConfig.model_validate({
        "name": "t", "source": {"kind": "local", "root": "/"},
        "embed": {"provider": "emulator", "model": "gemini-embedding-2"},
        "sink": {"kind": "lance", "uri": "/tmp/unused"}})
    obj = SourceObject(f"file:///{key}", key, len(data), datetime.now(UTC), "v1")
    return list(Validator(job).fit(obj, data))


def _api_accepts(data: bytes, mime: str) -> None:
    """What the emulator does with one inline part; raises its ApiFault (a 400) if refused."""
    body = {"content": {"parts": [{"inlineData": {
        "mimeType": mime, "data": base64.b64encode(data).decode()}}]}}
    parse_request(body, SPEC, in_batch=False)


def _mp4(seconds: float, *, fps: int = 2, gop: int = 10) -> bytes:
    """H.264 video with an AAC track (whose encoder delay makes its header a little longer)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        video.codec_context.gop_size = gop
        video.options = {"preset": "ultrafast"}
        audio = out.add_stream("aac", rate=8000)
        audio.layout = "mono"
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i % 255, np.uint8),
                                               format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode())
        total, t = int(seconds * 8000), 0
        while t < total:
            n = min(1024, total - t)
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, n), np.float32), format="fltp",
                                               layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = 8000, t, Fraction(1, 8000)
            out.mux(audio.encode(chunk))
            t += n
        out.mux(audio.encode())
    return buf.getvalue()


def test_a_video_of_exactly_the_limit_is_split_and_every_part_is_accepted():
    data = _mp4(120.0)
    assert probe(data).measured_s == pytest.approx(120.0)
    _api_accepts(data, "video/mp4")  # one measure on both sides: 120.000 s is within 120 s
    items = _validate(data, "clip.mp4")
    assert len(items) == 2 and all(isinstance(i, Item) for i in items), items
    for item in items:
        assert isinstance(item, Item)
        (part,) = item.parts
        assert part.data is not None and part.mime is not None
        _api_accepts(part.data, part.mime)
        assert (item.span.time_end_s or 0) - (item.span.time_start_s or 0) <= 119.0 + 1e-6


def test_a_video_that_cannot_be_cut_names_the_real_limit():
    (reject,) = _validate(_mp4(125.0, gop=1000), "long.mp4")  # one keyframe: no cut point
    assert isinstance(reject, Reject) and reject.reason == "too_long"
    assert "over the 120 s limit" in reject.message, reject.message


def _png_with_bad_crc() -> bytes:
    """A PNG whose IDAT checksum is wrong: Pillow decodes it (it checks the checksums of the
    chunks before the image data when opening, not the image data's when loading)."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "teal").save(out, format="PNG")
    png = bytearray(out.getvalue())
    at = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[at:at + 4])
    crc_at = at + 8 + length
    png[crc_at:crc_at + 4] = struct.pack(">I", zlib.crc32(bytes(png[at + 4:crc_at])) ^ 0xFFFF)
    return bytes(png)


def test_a_png_with_a_wrong_chunk_checksum_is_refused_on_both_sides():
    png = _png_with_bad_crc()
    Image.open(io.BytesIO(png)).load()  # it decodes: only the checksum is wrong
    (reject,) = _validate(png, "chart.png")
    assert isinstance(reject, Reject) and reject.reason == "corrupt"
    with pytest.raises(ApiFault) as refused:
        _api_accepts(png, "image/png")
    assert refused.value.code == 400
