"""The real type of a file, from its first bytes (magic numbers), never from its name.

The extension is only used to tell text flavours apart (``.md`` vs ``.csv``) once the bytes
say "text", and to name what the file claimed to be in a reject message.
"""

from __future__ import annotations

from connectors.blob import Blob
from pipeline.errors import ItemRejected, RejectReason

OCTET = "application/octet-stream"

TEXT_EXTENSIONS = {
    ".txt": "text/plain",
    ".text": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".rst": "text/x-rst",
    ".csv": "text/csv",
    ".tsv": "text/tab-separated-values",
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".html": "text/html",
    ".htm": "text/html",
    ".xml": "text/xml",
    ".yaml": "text/yaml",
    ".yml": "text/yaml",
    ".log": "text/plain",
}

TEXT_MIMES = frozenset(TEXT_EXTENSIONS.values())


def is_text(mime: str) -> bool:
    """Whether files of ``mime`` are read as text (JSON and YAML too)."""
    return mime.startswith("text/") or mime in TEXT_MIMES


EXTENSION_MIMES = {
    **TEXT_EXTENSIONS,
    ".pdf": "application/pdf",
    ".png": "image/png",
    ".apng": "image/apng",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".webp": "image/webp",
    ".heic": "image/heic",
    ".avif": "image/avif",
    ".mp3": "audio/mpeg",
    ".wav": "audio/wav",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".flac": "audio/flac",
    ".m4a": "audio/mp4",
    ".m4b": "audio/mp4",
    ".aif": "audio/aiff",
    ".aiff": "audio/aiff",
    ".mid": "audio/midi",
    ".wma": "audio/x-ms-wma",
    ".mp4": "video/mp4",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".avi": "video/x-msvideo",
}

_QUICKTIME_BRANDS = {b"qt  "}
_AUDIO_MP4_BRANDS = {b"M4A ", b"M4B ", b"M4P "}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


def extension_mime(name: str) -> str | None:
    """What the file name claims (lower-cased extension), for messages and text flavours."""
    return EXTENSION_MIMES.get(suffix(name))


def _split_name(key: str) -> tuple[str, str]:
    """(stem, extension) of a '/'-separated key's file name, by ``PurePosixPath``'s rule (a
    leading or trailing dot is not an extension), with string operations: this runs for every
    file."""
    name = key.rpartition("/")[2]
    dot = name.rfind(".")
    return (name[:dot], name[dot:]) if 0 < dot < len(name) - 1 else (name, "")


def suffix(key: str) -> str:
    """The lower-cased extension, as ``PurePosixPath.suffix.lower()`` gives it."""
    return _split_name(key)[1].lower()


def stem(key: str) -> str:
    """The file name without its extension, as ``PurePosixPath.stem`` gives it."""
    return _split_name(key)[0]


def _ftyp(head: bytes) -> str | None:
    if head[4:8] != b"ftyp":
        return None
    major = head[8:12]
    brands = {major} | {head[i : i + 4] for i in range(16, min(len(head), 64), 4)}
    if major in _HEIF_BRANDS:
        return "image/heic"
    if major in _AVIF_BRANDS:
        return "image/avif"
    if major in _QUICKTIME_BRANDS:
        return "video/quicktime"
    if major in _AUDIO_MP4_BRANDS:
        return "audio/mp4"
    if brands & _AVIF_BRANDS and not brands & {b"isom", b"mp41", b"mp42"}:
        return "image/avif"
    return "video/mp4"


def _riff(head: bytes) -> str | None:
    if head[:4] not in (b"RIFF", b"RIFX"):
        return None
    return {b"WAVE": "audio/wav", b"WEBP": "image/webp", b"AVI ": "video/x-msvideo"}.get(
        head[8:12], OCTET
    )


def _mp3(head: bytes) -> bool:
    if head[:3] == b"ID3":
        return True
    # An MPEG audio frame sync: 11 set bits, a valid layer, not a reserved bitrate.
    return (
        len(head) >= 2
        and head[0] == 0xFF
        and (head[1] & 0xE0) == 0xE0
        and (head[1] & 0x06) != 0
        and (head[1] & 0x18) != 0x08
    )


def _png_kind(head: bytes) -> str:
    # An animated PNG carries an acTL chunk before the first IDAT.
    idat = head.find(b"IDAT")
    actl = head.find(b"acTL")
    if actl != -1 and (idat == -1 or actl < idat):
        return "image/apng"
    return "image/png"


# The first byte of each signature tested from the start of the file, and the box names an
# ISO/QuickTime file has at bytes 4-8: a head with neither can only be a PDF (its marker may
# come later), which lets most text files through with two tests.
_FIRST_BYTES = frozenset(b"\x89\xff\x1f\x1a\x30GBIMRFOfPw7")
_BOXES = frozenset((b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"))


def sniff_bytes(head: bytes) -> str | None:
    """The MIME type the leading bytes prove, or None if they prove no binary format."""
    if head and head[0] not in _FIRST_BYTES and head[4:8] not in _BOXES:
        return "application/pdf" if b"%PDF-" in head[:1024] else None
    return _signature(head)


def _signature(head: bytes) -> str | None:
    """:func:`sniff_bytes`, every signature tried in turn."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_kind(head)
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if b"%PDF-" in head[:1024]:
        return "application/pdf"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:2] == b"BM" and len(head) >= 26:
        return "image/bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if (kind := _ftyp(head)) is not None:
        return kind
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "video/quicktime"  # an ISO/QuickTime file without an ftyp box
    if (kind := _riff(head)) is not None:
        return kind
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "audio/aiff"
    if head[:4] == b"OggS":
        return "audio/ogg"
    if head[:4] == b"fLaC":
        return "audio/flac"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "video/webm" if b"webm" in head[:64] else "video/x-matroska"
    if head[:4] == b"MThd":
        return "audio/midi"
    if head[:16] == bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c"):
        return "video/x-ms-asf"
    if head[:4] == b"IMPM":
        return "audio/x-it"
    if head[:4] == b"wvpk":
        return "audio/x-wavpack"
    if head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")):
        return "application/zip" if head[:2] == b"PK" else OCTET
    if _mp3(head):
        return "audio/mpeg"
    return None


_CONTROL_BYTES = bytes([*range(9), *range(14, 32)])


def looks_like_text(head: bytes) -> bool:
    """No NUL bytes and few control characters: worth trying a text decoder on."""
    if not head:
        return False
    if b"\x00" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return False
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    return controls <= len(head) // 100


# Longest first: UTF-32 LE's BOM begins with UTF-16 LE's.
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"),
         (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


_BOM_FIRST = frozenset(bom[0] for bom, _ in _BOMS)


def bom_encoding(head: bytes) -> str | None:
    """The encoding a byte-order mark names (Python's codec, which strips the mark)."""
    if not head or head[0] not in _BOM_FIRST:  # most files: no mark (this runs for each)
        return None
    return next((enc for bom, enc in _BOMS if head.startswith(bom)), None)


def utf16_without_bom(head: bytes) -> str | None:
    """'utf-16-le' or 'utf-16-be' for text written in UTF-16 without a BOM, told by its zero
    bytes: mostly-Latin text has a zero in every other byte, on one side only."""
    pairs = len(head) // 2
    if pairs < 2 or b"\x00" not in head:  # no zero byte: not UTF-16 (most files)
        return None
    even = head[0:pairs * 2:2].count(0)
    odd = head[1:pairs * 2:2].count(0)
    for zeros, other, encoding in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
        if zeros >= 0.3 * pairs and other <= 0.02 * pairs:
            # "replace": the head may end inside a surrogate pair
            text = head[:pairs * 2].decode(encoding, errors="replace")
            printable = sum(c.isprintable() or c in "\t\r\n" for c in text)
            return encoding if text and printable >= 0.95 * len(text) else None
    return None


def sniff(head: bytes, name: str) -> str:
    """The file's real MIME type; for text, the flavour its extension names (else text/plain).
    A byte-order mark is text before anything else (UTF-16 LE's looks like an MP3 frame)."""
    return _sniff(head, extension_mime(name))


def _sniff(head: bytes, claimed: str | None) -> str:
    """:func:`sniff`, given what the name claims."""
    if bom_encoding(head) is not None:
        return _text_flavour(claimed)
    kind = sniff_bytes(head)
    if kind is not None:
        return kind
    if utf16_without_bom(head) is not None or looks_like_text(head):
        return _text_flavour(claimed)
    return OCTET


def _text_flavour(claimed: str | None) -> str:
    return claimed if claimed in TEXT_MIMES else "text/plain"


def sniffed_mime(key: str, data: Blob) -> str:
    """The file's type from its first bytes; an empty file, or plain text named as a binary
    format, is rejected."""
    claimed = extension_mime(key)
    binary_claim = claimed is not None and claimed not in TEXT_MIMES
    if not data.size:
        raise ItemRejected(RejectReason.EMPTY, "file is empty (0 bytes)")
    mime = _sniff(data.head(4096), claimed)
    if binary_claim and is_text(mime):
        raise ItemRejected(
            RejectReason.CORRUPT,
            f"named as {claimed} but its bytes are plain text (no {claimed} header)",
        )
    return mime
