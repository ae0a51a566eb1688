"""Audio and video cut to the model's limits, one segment at a time.

- :func:`audio_segments` decodes and encodes consecutive MP3 segments of at most ``max_s``
  seconds (mono, 22.05 kHz).
- :func:`video_segments` cuts at keyframes and remuxes without re-encoding (fast, lossless);
  :func:`video_transcode` re-encodes other containers to H.264 MP4, split the same way.

What a file is and how long it lasts is measured first, by :mod:`pipeline.validate.measure`. All
generators check a deadline between segments.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av

from pipeline.errors import ItemRejected, RejectReason
from pipeline.validate.deadline import Deadline
from pipeline.validate.measure import (
    AV_ERRORS,
    SCALE_THREADS,
    Media,
    MediaInfo,
    open_container,
    real_video_streams,
    timeout_reject,
)

AUDIO_RATE = 22_050
VIDEO_CODECS = frozenset({"h264", "hevc", "av1", "vp9"})


@dataclass(frozen=True, slots=True)
class Segment:
    start_s: float
    end_s: float
    data: bytes
    mime: str

# --- audio output -----------------------------------------------------------------------------


def audio_segments(data: Media, max_s: float, deadline: Deadline) -> Iterator[Segment]:
    """Decode and re-encode as MP3 segments of at most ``max_s`` seconds (mono, 22.05 kHz)."""
    limit = int(max_s * AUDIO_RATE)
    with open_container(data) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16p", layout="mono", rate=AUDIO_RATE)
        encoder: _Mp3Writer | None = None
        written = 0
        start = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    if encoder is not None and written + out.samples > limit:
                        yield encoder.close(start / AUDIO_RATE, (start + written) / AUDIO_RATE)
                        start += written
                        encoder, written = None, 0
                        if deadline.passed():
                            raise timeout_reject("splitting the audio")
                    if encoder is None:
                        encoder = _Mp3Writer()
                    encoder.write(out)
                    written += out.samples
        except AV_ERRORS:
            pass  # decode what decodes: the probe already measured the same stream
        if encoder is not None and written:
            yield encoder.close(start / AUDIO_RATE, (start + written) / AUDIO_RATE)


class _Encoder:
    """One output segment being encoded in memory; ``close`` flushes it into a Segment."""

    mime = ""
    buf: io.BytesIO
    out: Any
    stream: Any

    def _encode(self, frame: Any) -> None:
        for packet in self.stream.encode(frame):
            self.out.mux(packet)

    def close(self, start_s: float, end_s: float) -> Segment:
        self._encode(None)
        self.out.close()
        return Segment(start_s, end_s, self.buf.getvalue(), self.mime)


class _Mp3Writer(_Encoder):
    mime = "audio/mpeg"

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.out = av.open(self.buf, mode="w", format="mp3")
        self.stream = self.out.add_stream("libmp3lame", rate=AUDIO_RATE, layout="mono")
        self.stream.bit_rate = 64_000

    def write(self, frame: Any) -> None:
        frame.pts = None
        self._encode(frame)


# --- video output -----------------------------------------------------------------------------


def cut_points(keyframes: list[float], duration: float, max_s: float) -> list[float] | None:
    """Segment starts, each at a keyframe, so that every segment lasts at most ``max_s``.
    None when two keyframes are further apart than ``max_s`` (cannot cut without re-encoding)."""
    cuts = [0.0]
    while duration - cuts[-1] > max_s:
        candidates = [k for k in keyframes if cuts[-1] < k <= cuts[-1] + max_s]
        if not candidates:
            return None
        cuts.append(max(candidates))
    return cuts


def video_segments(data: Media, info: MediaInfo, max_s: float, deadline: Deadline, *,
                   limit_s: float | None = None) -> Iterator[Segment]:
    """Remux the video stream (no audio: the model ignores it) into MP4 segments cut at
    keyframes, without re-encoding. Segments are at most ``max_s``; ``limit_s`` is the model's
    limit, named in the reject."""
    cuts = cut_points(info.keyframes, info.measured_s, max_s)
    if cuts is None:
        raise ItemRejected(RejectReason.TOO_LONG,
                           f"video is {info.measured_s:.1f} s, over the {limit_s or max_s:g} s "
                           f"limit, and its keyframes are too far apart to cut it into parts of "
                           f"at most {max_s:g} s without re-encoding")
    bounds = [*cuts, math.inf]
    with open_container(data) as container:
        stream = real_video_streams(container)[0]
        tb = stream.time_base
        first: float | None = None
        index = 0
        writer: _Remuxer | None = None
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            t = float(packet.pts * tb)
            first = t if first is None else first
            rel = t - first
            while packet.is_keyframe and rel >= bounds[index + 1] - 1e-6:
                if writer is not None:
                    yield writer.close(bounds[index], min(bounds[index + 1], info.measured_s))
                    writer = None
                    if deadline.passed():
                        raise timeout_reject("splitting the video")
                index += 1
            if writer is None:
                writer = _Remuxer(stream, packet)
            writer.mux(packet)
        if writer is not None:
            yield writer.close(bounds[index], info.measured_s)


class _Remuxer:
    def __init__(self, template: Any, first: Any) -> None:
        self.buf = io.BytesIO()
        self.out = av.open(self.buf, mode="w", format="mp4")
        self.stream = self.out.add_stream_from_template(template)
        # One offset for pts and dts keeps pts >= dts; the keyframe's dts is the segment's first.
        self.offset = first.dts if first.dts is not None else first.pts

    def mux(self, packet: Any) -> None:
        packet.pts -= self.offset
        if packet.dts is not None:
            packet.dts -= self.offset
        packet.stream = self.stream
        self.out.mux(packet)

    def close(self, start_s: float, end_s: float) -> Segment:
        self.out.close()
        return Segment(start_s, end_s, self.buf.getvalue(), "video/mp4")


def video_transcode(data: Media, info: MediaInfo, max_s: float, deadline: Deadline,
                    max_height: int = 720) -> Iterator[Segment]:
    """Re-encode to H.264 MP4 segments of at most ``max_s`` (for WebM, MKV, AVI, ...)."""
    with open_container(data) as container:
        stream = real_video_streams(container)[0]
        rate = stream.average_rate or stream.guessed_rate or 25
        writer: _H264Writer | None = None
        seg_start = 0.0
        first: float | None = None
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                first = frame.time if first is None else first
                rel = frame.time - first
                if writer is not None and rel - seg_start >= max_s:
                    yield writer.close(seg_start, rel)
                    seg_start, writer = rel, None
                if deadline.passed():
                    raise timeout_reject("converting the video")
                if writer is None:
                    writer = _H264Writer(frame.width, frame.height, rate, max_height)
                writer.write(frame)
        except AV_ERRORS:
            pass  # keep what decoded; the probe checked the file opens and decodes
        if writer is not None:
            yield writer.close(seg_start, info.measured_s)


class _H264Writer(_Encoder):
    mime = "video/mp4"

    def __init__(self, width: int, height: int, rate: Any, max_height: int) -> None:
        scale = min(1.0, max_height / max(height, 1))
        self.width = max(2, int(width * scale) // 2 * 2)
        self.height = max(2, int(height * scale) // 2 * 2)
        self.buf = io.BytesIO()
        self.out = av.open(self.buf, mode="w", format="mp4")
        self.stream = self.out.add_stream("libx264", rate=rate)
        self.stream.codec_context.time_base = 1 / Fraction(rate)
        self.stream.width, self.stream.height = self.width, self.height
        self.stream.pix_fmt = "yuv420p"
        # The same file must give the same bytes (and so the same vector and no re-embedding)
        # on any machine, run or engine. x264's output depends on its thread count, by default
        # one from the CPUs this process may use: one thread. And its lookahead (macroblock
        # tree rate control) made different bytes from identical frames in about one encode in
        # four of bad/Megamind_bugy.avi, in one process with one thread (not with asm=0: an
        # assembly path reads memory it did not write); rc-lookahead=0 turns it off, at the
        # same speed. Without the tree, crf 28 spends more bits: converted files are 1.4-1.5x
        # larger (four corpus videos; crf 31 would bring them back to 0.92-1.16x).
        self.stream.options = {"preset": "veryfast", "crf": "28",
                               "x264-params": "rc-lookahead=0"}
        self.stream.codec_context.thread_count = 1
        self.count = 0

    def write(self, frame: Any) -> None:
        frame = frame.reformat(width=self.width, height=self.height, format="yuv420p",
                               threads=SCALE_THREADS)
        frame.pts = self.count
        frame.time_base = self.stream.codec_context.time_base
        self.count += 1
        self._encode(frame)
