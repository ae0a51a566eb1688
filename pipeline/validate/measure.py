"""Audio and video measured: what a file is, and how long it lasts.

Everything goes through PyAV (its wheel ships FFmpeg), never a system binary.

- :func:`probe` opens the container, classifies it by its streams (a video stream that is only
  cover art does not make a file a video), and measures the duration from what demuxes
  (video) or decodes (audio). A header that claims far more than the stream holds makes the
  file ``corrupt`` (truncated), so a lying header cannot make the run wrong. The emulator
  measures with it too.
- :func:`probe_header` reads the header and index, the first frames and the packets at the end
  the header claims, no more (``plan`` over a store, read by range).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import av
import mutagen

from connectors.blob import Blob
from pipeline.errors import ItemRejected, RejectReason
from pipeline.validate.deadline import Deadline

logging.getLogger("libav").setLevel(logging.CRITICAL)
av.logging.set_level(av.logging.PANIC)

TRUNCATION_RATIO = 0.8  # decoded / claimed below this (minus 1 s of slack) means truncated
Media = bytes | Blob  # a file in memory, or a blob read through readers of its own
# Demuxers whose seek reads every packet from the start (no index): probe_header does not seek
# to the end the header claims in them (a truncated MP3 is found by the run).
SCANNING_SEEK = frozenset({"mp3", "aac"})
# What probe_header lets FFmpeg read to find the streams (the container's header names them).
HEADER_PROBE_BYTES = 32 * 1024
# Scale frames in the calling thread. PyAV (from 18.1.1) keeps one scaler per thread in a
# thread-local, by default with its own slice threads; a fork (Ray starting its daemons, any
# subprocess with a preexec_fn) frees the other threads' scalers in the child, which then waits
# forever for slice threads that do not exist there.
SCALE_THREADS = 1

AV_ERRORS = (av.error.FFmpegError, ValueError, OSError, IndexError, KeyError, ZeroDivisionError,
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
    from_header: bool = False  # the header's word, not measured (plan over a store)

def _corrupt(message: str) -> ItemRejected:
    return ItemRejected(RejectReason.CORRUPT, message)


def reader_of(data: Media) -> BinaryIO:
    return io.BytesIO(data) if isinstance(data, bytes) else data.open()


@contextmanager
def open_container(data: Media, options: dict[str, str] | None = None) -> Iterator[Any]:
    """The container, read from memory or, for a blob on disk, through a reader of its own."""
    with reader_of(data) as reader:
        try:
            container = av.open(reader, mode="r", metadata_errors="ignore", options=options)
        except AV_ERRORS as exc:
            raise _corrupt(f"the media container cannot be opened: {exc}") from exc
        with container:
            yield container


def _header_seconds(data: Media, container: Any) -> float | None:
    try:
        with reader_of(data) as reader:
            info = mutagen.File(reader)
        length = getattr(getattr(info, "info", None), "length", None)
        if length and length > 0:
            return float(length)
    except Exception:  # mutagen raises many unrelated types on garbage; the header is optional
        pass
    if container.duration and container.duration > 0:
        return float(container.duration / av.time_base)
    return None


def real_video_streams(container: Any) -> list[Any]:
    attached = av.stream.Disposition.attached_pic
    return [s for s in container.streams.video
            if not (s.disposition & attached) and s.codec_context.name not in ("png", "bmp")]


def probe(data: Media, deadline: Deadline | None = None) -> MediaInfo:
    """What the media is and how long it lasts, measured from what demuxes or decodes. The
    emulator measures with this too, so the validator's verdict is the API's."""
    deadline = deadline or Deadline.never()
    with open_container(data) as container:
        header = _header_seconds(data, container)
        videos = real_video_streams(container)
        audio = container.streams.audio[0] if container.streams.audio else None
        if videos:
            return _probe_video(container, videos[0], header, deadline)
        if audio is not None:
            return _probe_audio(container, audio, header, deadline)
    raise _corrupt("the container holds no audio or video stream")


def probe_header(data: Media) -> MediaInfo:
    """What the media is and how long its header says it lasts, from the container's header
    and index, the first frames and the packets at the end the header claims: nothing else
    demuxed or decoded, so a blob read by range fetches a fraction of the file (``plan`` over
    a store). A header that states no duration is measured as :func:`probe` measures."""
    with open_container(data, {"probesize": str(HEADER_PROBE_BYTES)}) as container:
        header = _header_seconds(data, container)
        videos = real_video_streams(container)
        audio = container.streams.audio[0] if container.streams.audio else None
        if not videos and audio is None:
            raise _corrupt("the container holds no audio or video stream")
        stream: Any = videos[0] if videos else audio
        if header is not None:
            kind = "video" if videos else "audio"
            _check_tail(container, stream, header, kind)
            info = MediaInfo(kind, header, header, from_header=True,
                             audio_codec=audio.codec_context.name if audio else None)
            if videos:
                video = stream.codec_context
                info.video_codec, info.width, info.height = video.name, video.width, video.height
                container.seek(0)
                _decode_first_frames(container, stream)
            return info
    return probe(data)


def _check_tail(container: Any, stream: Any, header: float, kind: str) -> None:
    """Packets demux up to the point :func:`_check_truncation` requires of a measured file
    (seeking there through the index: one keyframe interval read, not the whole file)."""
    need = header * TRUNCATION_RATIO - 1.0
    if need <= 0 or set(container.format.name.split(",")) & SCANNING_SEEK:
        return
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    reached = 0.0
    try:
        container.seek(int((start + need) / tb), stream=stream, backward=True, any_frame=True)
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            reached = float((packet.pts + (packet.duration or 0)) * tb) - start
            if reached >= need:
                return
    except AV_ERRORS:
        pass
    raise _corrupt(f"truncated: the header claims {header:.1f} s of {kind} but nothing can be "
                   f"read after {reached:.1f} s")


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
                raise timeout_reject("measuring the audio")
    except AV_ERRORS as exc:
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
                raise timeout_reject("reading the video")
    except AV_ERRORS as exc:
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
            frame.to_ndarray(format="rgb24", threads=SCALE_THREADS) if decoded == 0 else None
            decoded += 1
            if decoded >= frames:
                return
    except AV_ERRORS as exc:
        if decoded == 0:
            raise _corrupt(f"the video does not decode: {exc}") from exc
    if decoded == 0:
        raise _corrupt("the video does not decode (no frame)")


def _check_truncation(header: float | None, measured: float, kind: str) -> None:
    if header is not None and measured < header * TRUNCATION_RATIO - 1.0:
        raise _corrupt(f"truncated: the header claims {header:.1f} s of {kind} but only "
                       f"{measured:.1f} s can be read")


def timeout_reject(doing: str) -> ItemRejected:
    return ItemRejected(RejectReason.TIMEOUT,
                        f"{doing} took longer than the per-file limit (validate.file_timeout_s)")
