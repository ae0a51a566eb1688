"""Audio and video fitted to the model's length limits: sent whole when within them (less the
margin measures differ by), else split into segments (audio re-encoded, video cut at keyframes
or re-encoded), or rejected ``too_long`` by policy. A part of :class:`pipeline.validate.Validator`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from connectors.blob import Blob
from pipeline.config import ValidateConfig
from pipeline.errors import ItemRejected, RejectReason
from pipeline.models import (
    DURATION_MARGIN_S,
    TOKENS_PER_AUDIO_SECOND,
    TOKENS_PER_VIDEO_FRAME,
    VIDEO_MAX_FRAMES,
    VIDEO_MIMES,
    ModelSpec,
)
from pipeline.records import Item, Modality, Part, SourceObject, Span
from pipeline.validate.deadline import Deadline
from pipeline.validate.measure import MediaInfo
from pipeline.validate.media import (
    VIDEO_CODECS,
    Segment,
    audio_segments,
    cut_points,
    video_segments,
    video_transcode,
)


class TimedMedia:
    """The audio and video half of the validator, and the limits every payload is held to;
    the validator provides what is declared here (its settings, the model, and how it makes
    items)."""

    cfg: ValidateConfig
    spec: ModelSpec
    model: str
    dry: bool

    def _item(self, obj: SourceObject, part: int, count: int, modality: Modality, mime: str,
              parts: tuple[Part, ...], tokens: int, span: Span, text: str | None = None,
              source_mime: str | None = None, doc_title: str | None = None) -> Item:
        raise NotImplementedError

    def _may_convert(self, mime: str, policy: str, allowed: list[str] | None, kind: str) -> None:
        if policy == "reject" or (allowed is not None and mime not in allowed):
            raise ItemRejected(
                RejectReason.UNSUPPORTED,
                f"{mime} is not a format {self.model} accepts and converting it is off "
                f"(validate.{kind}_policy: convert, validate.{kind}_convert_from)")

    def _inline_ok(self, size: int) -> bool:
        """``size`` bytes fit the inline payload limit once base64-encoded."""
        return (size + 2) // 3 * 4 <= self.cfg.max_inline_bytes

    def _too_large(self, what: str, size: int) -> ItemRejected:
        return ItemRejected(
            RejectReason.TOO_LARGE,
            f"{what} is {size:,} bytes, over the inline payload limit of "
            f"{self.cfg.max_inline_bytes:,} bytes once base64-encoded (validate.max_inline_bytes)")


    def _too_long(self, kind: str, info: MediaInfo, max_s: float) -> bool:
        """Over the limit (less the margin measures differ by): True (to split), or a
        ``too_long`` reject when splitting is off."""
        if info.measured_s <= max_s - DURATION_MARGIN_S:
            return False
        if self.cfg.too_long == "reject":
            raise ItemRejected(RejectReason.TOO_LONG, f"{kind} is {info.measured_s:.3f} s; the "
                               f"limit is {max_s:g} s, and media within {DURATION_MARGIN_S:g} s "
                               "of it are split (validate.too_long: split to cut it)")
        return True

    def _whole(self, obj: SourceObject, data: Blob, mime: str, modality: Modality,
               info: MediaInfo, tokens: int) -> Item:
        """A media file sent as it is: one item spanning its whole duration (planned from a
        store's header: no payload read)."""
        payload = b"" if self.dry and data.is_ranged else data.read()
        return self._item(obj, 0, 1, modality, mime, (Part(mime=mime, data=payload),), tokens,
                          Span(time_start_s=0.0, time_end_s=info.measured_s))

    def _audio(self, obj: SourceObject, data: Blob, mime: str, info: MediaInfo,
               deadline: Deadline) -> Iterator[Item]:
        max_s = self.cfg.audio_max_s or self.spec.max_audio_s
        as_is = mime in self.cfg.audio_formats
        if not as_is:
            self._may_convert(mime, self.cfg.audio_policy, self.cfg.audio_convert_from, "audio")
        too_long = self._too_long("audio", info, max_s)
        if as_is and not too_long and self._inline_ok(data.size):
            yield self._whole(obj, data, mime, Modality.AUDIO, info,
                              _audio_tokens(info.measured_s))
            return
        # Cut a little under the limit: cuts fall on frame boundaries.
        length = max(1.0, max_s - 1.0) if max_s > 2 else max_s
        count = max(1, math.ceil(info.measured_s / length - 1e-9))
        segments = (_spans(info.measured_s, length, "audio/mpeg") if self.dry
                    else audio_segments(data, length, deadline))
        yield from self._segments(obj, segments, count, Modality.AUDIO, _audio_tokens, mime)

    def _video(self, obj: SourceObject, data: Blob, mime: str, info: MediaInfo,
               deadline: Deadline) -> Iterator[Item]:
        max_s = self.cfg.video_max_s or self.spec.max_video_s
        native = mime in VIDEO_MIMES and info.video_codec in VIDEO_CODECS
        if not native:
            self._may_convert(mime, self.cfg.video_policy, self.cfg.video_convert_from, "video")
        too_long = self._too_long("video", info, max_s)
        if native and not too_long and self._inline_ok(data.size):
            yield self._whole(obj, data, mime, Modality.VIDEO, info,
                              _video_tokens(info.measured_s))
            return
        if native:
            # Shorter segments when the bytes, not the seconds, are over the limit.
            per_s = data.size / max(info.measured_s, 1e-3)
            by_size = 0.8 * self.cfg.max_inline_bytes * 3 / 4 / per_s
            # A second of slack: containers report a little more than the packets span.
            length = min(max(1.0, max_s - 1.0) if max_s > 2 else max_s, by_size)
            if info.from_header:  # plan from the header: keyframes unread, cut by length
                count = max(1, math.ceil(info.measured_s / length - 1e-9))
                segments = _spans(info.measured_s, length, "video/mp4")
            else:
                cuts = cut_points(info.keyframes, info.measured_s, length)
                count = len(cuts) if cuts is not None else 1
                segments = (_cut_spans(cuts, info.measured_s) if self.dry and cuts is not None
                            else video_segments(data, info, length, deadline, limit_s=max_s))
        else:
            length = max(1.0, max_s - 1.0) if max_s > 2 else max_s
            count = max(1, math.ceil(info.measured_s / length - 1e-9))
            segments = (_spans(info.measured_s, length, "video/mp4") if self.dry
                        else video_transcode(data, info, length, deadline))
        yield from self._segments(obj, segments, count, Modality.VIDEO, _video_tokens, mime)

    def _segments(self, obj: SourceObject, segments: Iterator[Segment], count: int,
                  modality: Modality, tokens: Callable[[float], int],
                  source_mime: str) -> Iterator[Item]:
        """One item per time segment of a media file."""
        for index, seg in enumerate(segments):
            if not self._inline_ok(len(seg.data)):
                raise self._too_large(f"{modality} {seg.start_s:.0f}-{seg.end_s:.0f} s",
                                      len(seg.data))
            yield self._item(obj, index, count, modality, seg.mime,
                             (Part(mime=seg.mime, data=seg.data),),
                             tokens(seg.end_s - seg.start_s),
                             Span(time_start_s=seg.start_s, time_end_s=seg.end_s),
                             source_mime=source_mime)


def _spans(total_s: float, length_s: float, mime: str) -> Iterator[Segment]:
    """Plan mode: consecutive time ranges of at most ``length_s``, without cutting anything."""
    count = max(1, math.ceil(total_s / length_s - 1e-9))
    for k in range(count):
        yield Segment(k * length_s, min((k + 1) * length_s, total_s), b"", mime)


def _cut_spans(cuts: list[float], total_s: float) -> Iterator[Segment]:
    for start, end in zip(cuts, [*cuts[1:], total_s], strict=True):
        yield Segment(start, end, b"", "video/mp4")


def _audio_tokens(seconds: float) -> int:
    return max(1, math.ceil(seconds * TOKENS_PER_AUDIO_SECOND))


def _video_tokens(seconds: float) -> int:
    return min(VIDEO_MAX_FRAMES, max(1, math.ceil(seconds))) * TOKENS_PER_VIDEO_FRAME
