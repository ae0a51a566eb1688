"""Images: prove that a PNG or JPEG decodes, convert other formats to PNG, and never hold a
decompression bomb in memory (the declared size is checked before any pixel is decoded)."""

from __future__ import annotations

import io
import warnings
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import ItemRejected, RejectReason

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)


def _open(data: bytes | BinaryIO, mime: str, max_pixels: int, formats: list[str] | None,
          size: int | None = None) -> Image.Image:
    """The image opened (its header read), ``data`` in memory or a reader of ``size`` bytes."""
    size = len(data) if isinstance(data, bytes) else size or 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data,
                             formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemRejected(RejectReason.CORRUPT, f"decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        if formats is None:
            raise ItemRejected(RejectReason.UNSUPPORTED,
                               f"no image decoder installed for {mime}") from exc
        raise ItemRejected(RejectReason.CORRUPT, f"not a readable {mime} image") from exc
    except _DECODE_ERRORS as exc:
        raise ItemRejected(RejectReason.CORRUPT, f"{mime} image header is unreadable: {exc}") from exc
    width, height = img.size
    pixels = width * height
    if pixels > max_pixels:
        # A few bytes claiming billions of pixels is an attack, not a big photo.
        reason = RejectReason.CORRUPT if size * 1000 < pixels else RejectReason.TOO_LARGE
        raise ItemRejected(reason, f"image declares {width}x{height} = {pixels:,} pixels; the "
                                   f"limit is {max_pixels:,} (validate.max_image_pixels)")
    return img


def check_image(data: bytes, mime: str, max_pixels: int) -> tuple[int, int]:
    """Decode the whole image (JPEG at 1/8 scale: every byte is still parsed). Returns its size."""
    img = _open(data, mime, max_pixels, ["PNG", "JPEG"])
    width, height = img.size
    if img.format == "PNG":
        # Chunk checksums, as the API checks them: a PNG that decodes with a wrong CRC is
        # still refused there.
        try:
            img.verify()
        except _DECODE_ERRORS as exc:
            raise ItemRejected(RejectReason.CORRUPT, f"PNG chunk check failed: {exc}") from exc
        img = _open(data, mime, max_pixels, ["PNG", "JPEG"])
    try:
        if img.format == "JPEG":
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        img.load()
    except _DECODE_ERRORS as exc:
        raise ItemRejected(RejectReason.CORRUPT, f"{mime} image does not decode: {exc}") from exc
    if getattr(img, "n_frames", 1) > 1:
        raise ItemRejected(RejectReason.UNSUPPORTED, "animated PNG (several frames)")
    return width, height


def probe_image(data: bytes | BinaryIO, mime: str, max_pixels: int,
                size: int | None = None) -> tuple[int, int]:
    """The declared size of any image a decoder opens, read from its header (plan mode);
    ``data`` may be a reader of ``size`` bytes, of which only the header is read."""
    dims: tuple[int, int] = _open(data, mime, max_pixels, None, size).size
    return dims


def convert_to_png(data: bytes, mime: str, max_pixels: int) -> bytes:
    """Any image Pillow decodes, as a PNG: EXIF orientation applied, first frame of animations."""
    img = _open(data, mime, max_pixels, None)
    try:
        img.seek(0)
        img = ImageOps.exif_transpose(img) or img
        if img.mode not in ("RGB", "RGBA", "L", "LA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        out = io.BytesIO()
        img.save(out, format="PNG", optimize=False)
    except _DECODE_ERRORS as exc:
        raise ItemRejected(RejectReason.CORRUPT, f"{mime} image does not decode: {exc}") from exc
    return out.getvalue()
