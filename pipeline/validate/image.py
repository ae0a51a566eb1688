"""Images: prove that a PNG or JPEG decodes, without ever holding a decompression bomb in memory."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from pipeline.errors import ItemRejected, RejectReason


def check_image(data: bytes, mime: str, max_pixels: int) -> tuple[int, int]:
    """Decode the whole image (JPEG at 1/8 scale: every byte is still parsed). Returns its size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
            width, height = img.size
            if width * height > max_pixels:
                raise ItemRejected(
                    RejectReason.TOO_LARGE,
                    f"image is {width}x{height} = {width * height:,} pixels; "
                    f"the limit is {max_pixels:,} (validate.max_image_pixels)",
                )
            if img.format == "JPEG":
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                raise ItemRejected(RejectReason.UNSUPPORTED, "animated image (several frames)")
            return width, height
    except ItemRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemRejected(RejectReason.TOO_LARGE, f"decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ItemRejected(RejectReason.CORRUPT, f"not a readable {mime} image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ItemRejected(RejectReason.CORRUPT, f"{mime} image does not decode: {exc}") from exc
