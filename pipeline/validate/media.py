"""Audio and video: measure what really decodes, then pass, split, convert or reject.

Everything goes through PyAV (its wheel ships FFmpeg), never a system binary.

- :func:`probe` opens the container, classifies it by its streams (a video stream that is only
  cover art does not make a file a video), and measures the duration from what demuxes
  (video) or decodes (audio). A header that claims far more than the stream holds makes the
  file ``corrupt`` (truncated), so a lying header cannot make the run wrong.
- :func:`audio_segments` decodes once more and encodes consecutive MP3 segments of at most
  ``max_s`` seconds (mono, 22.05 kHz), one at a time.
- :func:`video_segments` cuts at keyframes and remuxes without re-encoding (fast, lossless);
  :func:`video_transcode` re-encodes other containers to H.264 MP4, split the same way.

All generators check a deadline between segments.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, BinaryIO

import av
import mutagen

from connectors.blob import Blob
from pipeline.errors import ItemRejected, RejectReason
from pipeline.validate.deadline import Deadline

logging.getLogger("libav").setLevel(logging.CRITICAL)
av.logging.set_level(av.logging.PANIC)

AUDIO_RATE = 22_050
TRUNCATION_RATIO = 0.8  # decoded / claimed below this (minus 1 s of slack) means truncated
Media = bytes | Blob  # a file in memory, or a blob read through readers of its own
VIDEO_CODECS = frozenset({"h264", "hevc", "av1", "vp9"})
_AV_ERRORS = (av.error.FFmpegError, ValueError, OSError, IndexError, KeyError, ZeroDivisionError,
              EOFError, RuntimeError)


@dataclass
class MediaInfo:
    kind: str  # "audio" or "video"
    header_s: float | None
    measured_s: float
    audio_codec: str | None = None
    video_codec: str | None = None
    keyframes: list[float] = field(default_factory=list)
    width: int = 0
    height: int = 0


@dataclass(frozen=True, slots=True)
class Segment:
    start_s: float
    end_s: float
    data: bytes
    mime: str


def _corrupt(message: str) -> ItemRejected:
    return ItemRejected(RejectReason.CORRUPT, message)


def _reader(data: Media) -> BinaryIO:
    return io.BytesIO(data) if isinstance(data, bytes) else data.open()


@contextmanager
def _open(data: Media) -> Iterator[Any]:
    """The container, read from memory or, for a blob on disk, through a reader of its own."""
    with _reader(data) as reader:
        try:
            container = av.open(reader, mode="r", metadata_errors="ignore")
        except _AV_ERRORS as exc:
            raise _corrupt(f"the media container cannot be opened: {exc}") from exc
        with container:
            yield container


def _header_seconds(data: Media, container: Any) -> float | None:
    try:
        with _reader(data) as reader:
            info = mutagen.File(reader)
        length = getattr(getattr(info, "info", None), "length", None)
        if length and length > 0:
            return float(length)
    except Exception:  # mutagen raises many unrelated types on garbage; the header is optional
        pass
    if container.duration and container.duration > 0:
        return float(container.duration / av.time_base)
    return None


def _real_video_streams(container: Any) -> list[Any]:
    attached = av.stream.Disposition.attached_pic
    return [s for s in container.streams.video
            if not (s.disposition & attached) and s.codec_context.name not in ("png", "bmp")]


def probe(data: Media, deadline: Deadline | None = None) -> MediaInfo:
    """What the media is and how long it lasts, measured from what demuxes or decodes. The
    emulator measures with this too, so the validator's verdict is the API's."""
    deadline = deadline or Deadline.never()
    with _open(data) as container:
        header = _header_seconds(data, container)
        videos = _real_video_streams(container)
        audio = container.streams.audio[0] if container.streams.audio else None
        if videos:
            return _probe_video(container, videos[0], header, deadline)
        if audio is not None:
            return _probe_audio(container, audio, header, deadline)
    raise _corrupt("the container holds no audio or video stream")


def _probe_audio(container: Any, stream: Any, header: float | None,
                 deadline: Deadline) -> MediaInfo:
    samples = 0
    rate = stream.codec_context.sample_rate or stream.rate or 0
    error: str | None = None
    try:
        for frame in container.decode(stream):
            samples += frame.samples
            rate = frame.sample_rate or rate
            if deadline.passed():
                raise _timeout("measuring the audio")
    except _AV_ERRORS as exc:
        error = str(exc)
    seconds = samples / rate if rate else 0.0
    if seconds <= 0:
        raise _corrupt(f"no audio decodes{': ' + error if error else ''}")
    _check_truncation(header, seconds, "audio")
    return MediaInfo("audio", header, seconds, audio_codec=stream.codec_context.name)


def _probe_video(container: Any, stream: Any, header: float | None,
                 deadline: Deadline) -> MediaInfo:
    info = MediaInfo("video", header, 0.0, video_codec=stream.codec_context.name,
                     width=stream.codec_context.width, height=stream.codec_context.height)
    if container.streams.audio:
        info.audio_codec = container.streams.audio[0].codec_context.name
    tb = stream.time_base
    start: float | None = None
    end = 0.0
    try:
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            t = float(packet.pts * tb)
            start = t if start is None else min(start, t)
            end = max(end, t + float((packet.duration or 0) * tb))
            if packet.is_keyframe:
                info.keyframes.append(t)
            if deadline.passed():
                raise _timeout("reading the video")
    except _AV_ERRORS as exc:
        if start is None:
            raise _corrupt(f"no video packet can be read: {exc}") from exc
    if start is None:
        raise _corrupt("the video stream holds no frames")
    info.measured_s = end - start
    info.keyframes = sorted(k - start for k in info.keyframes)
    _check_truncation(header, info.measured_s, "video")
    container.seek(0)
    _decode_first_frames(container, stream)
    return info


def _decode_first_frames(container: Any, stream: Any, frames: int = 3) -> None:
    decoded = 0
    try:
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24") if decoded == 0 else None
            decoded += 1
            if decoded >= frames:
                return
    except _AV_ERRORS as exc:
        if decoded == 0:
            raise _corrupt(f"the video does not decode: {exc}") from exc
    if decoded == 0:
        raise _corrupt("the video does not decode (no frame)")


def _check_truncation(header: float | None, measured: float, kind: str) -> None:
    if header is not None and measured < header * TRUNCATION_RATIO - 1.0:
        raise _corrupt(f"truncated: the header claims {header:.1f} s of {kind} but only "
                       f"{measured:.1f} s can be read")


def _timeout(doing: str) -> ItemRejected:
    return ItemRejected(RejectReason.TIMEOUT,
                        f"{doing} took longer than the per-file limit (validate.file_timeout_s)")


# --- audio output -----------------------------------------------------------------------------


def audio_segments(data: Media, max_s: float, deadline: Deadline) -> Iterator[Segment]:
    """Decode and re-encode as MP3 segments of at most ``max_s`` seconds (mono, 22.05 kHz)."""
    limit = int(max_s * AUDIO_RATE)
    with _open(data) as container:
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
                            raise _timeout("splitting the audio")
                    if encoder is None:
                        encoder = _Mp3Writer()
                    encoder.write(out)
                    written += out.samples
        except _AV_ERRORS:
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
    with _open(data) as container:
        stream = _real_video_streams(container)[0]
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
                        raise _timeout("splitting the video")
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
    with _open(data) as container:
        stream = _real_video_streams(container)[0]
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
                    raise _timeout("converting the video")
                if writer is None:
                    writer = _H264Writer(frame.width, frame.height, rate, max_height)
                writer.write(frame)
        except _AV_ERRORS:
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
        frame = frame.reformat(width=self.width, height=self.height, format="yuv420p")
        frame.pts = self.count
        frame.time_base = self.stream.codec_context.time_base
        self.count += 1
        self._encode(frame)
