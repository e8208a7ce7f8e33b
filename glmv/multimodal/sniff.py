"""What a media file really is, from its first bytes (magic numbers), never a name or MIME type.

Only the formats below are handed to a decoder, and each to the one decoder of its format (a
Pillow plugin or an FFmpeg demuxer), which keeps the many other parsers of Pillow and FFmpeg (HLS
playlists that fetch URLs, concat lists that read files) away from request data.

    images     JPEG, PNG, GIF, BMP, TIFF, WEBP                  -> Pillow, that plugin only
               (animated GIF/WEBP/PNG and multi-page TIFF: the first frame)
    videos     MP4, M4V, MOV, AVI, MKV, WEBM, WMV, FLV, MPEG     -> FFmpeg, that demuxer only
    documents  PDF, PPT, PPTX (the latter two through LibreOffice)

Other recognisable files (HTML pages, audio, archives, other image formats) get a name too, so an
error can say what was sent instead.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Literal

Kind = Literal["image", "video", "document", "unsupported"]

#: Bytes `sniff` needs to tell every format apart except ZIP/OLE2 office files (the whole file).
HEAD_BYTES = 4096

SUPPORTED = {
    "image": "JPEG, PNG, GIF, BMP, TIFF, WEBP",
    "video": "MP4, M4V, MOV, AVI, MKV, WEBM, WMV, FLV, MPEG",
    "document": "PDF, PPT, PPTX",
}


@dataclass(frozen=True)
class MediaFormat:
    """A recognised file format: what kind of media it is and which decoder reads it."""

    kind: Kind  # "unsupported": recognised, but not accepted as any media
    name: str  # "PNG", "MP4", "PDF", "HTML page", ...
    noun: str  # what it is in words: "image", "video", "document", "page", "file", ...
    pil_format: str | None = None  # the Pillow plugin that decodes it (images)
    av_format: str | None = None  # the FFmpeg demuxer that reads it (videos)

    def describe(self) -> str:
        """'a PNG image', 'an MP4 video', 'an HTML page', ..."""
        spoken_as_letters = self.name[:1] in "AEFHILMNORSX" and self.name not in _SPOKEN_AS_WORDS
        article = "an" if spoken_as_letters else "a"
        return f"{article} {self.name} {self.noun}"


# Names said as a word, not letter by letter ("a MOV video", "a HEIC image").
_SPOKEN_AS_WORDS = {"MOV", "RAR", "RIFF", "HEIC", "HEIF", "FLAC", "OLE2"}


def _image(name: str, pil: str) -> MediaFormat:
    return MediaFormat("image", name, "image", pil_format=pil)


def _video(name: str, demuxer: str) -> MediaFormat:
    return MediaFormat("video", name, "video", av_format=demuxer)


def _other(name: str, noun: str) -> MediaFormat:
    return MediaFormat("unsupported", name, noun)


PDF = MediaFormat("document", "PDF", "document")
PPT = MediaFormat("document", "PPT", "presentation")
PPTX = MediaFormat("document", "PPTX", "presentation")

# (offset, magic) -> format; checked in order after the special cases in `sniff`.
_MAGIC: tuple[tuple[int, bytes, MediaFormat], ...] = (
    (0, b"\xff\xd8\xff", _image("JPEG", "JPEG")),
    (0, b"\x89PNG\r\n\x1a\n", _image("PNG", "PNG")),
    (0, b"GIF87a", _image("GIF", "GIF")),
    (0, b"GIF89a", _image("GIF", "GIF")),
    (0, b"II*\x00", _image("TIFF", "TIFF")),
    (0, b"MM\x00*", _image("TIFF", "TIFF")),
    (0, b"II+\x00", _other("BigTIFF", "image")),
    (0, b"MM\x00+", _other("BigTIFF", "image")),
    (0, b"\x1aE\xdf\xa3", _video("MKV", "matroska")),  # EBML; WEBM told apart in `sniff`
    (0, b"0&\xb2u\x8ef\xcf\x11\xa6\xd9\x00\xaa\x00b\xcel", _video("WMV", "asf")),
    (0, b"FLV\x01", _video("FLV", "flv")),
    (0, b"\x00\x00\x01\xba", _video("MPEG", "mpeg")),  # program stream (.mpg, .vob)
    (0, b"\x00\x00\x01\xb3", _video("MPEG", "mpegvideo")),  # MPEG-1/2 video elementary stream
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", _other("OLE2", "file (legacy Office format)")),
    (0, b"PK\x03\x04", _other("ZIP", "archive")),
    (0, b"PK\x05\x06", _other("ZIP", "archive")),
    (0, b"8BPS", _other("PSD", "image")),
    (0, b"\x00\x00\x01\x00", _other("ICO", "image")),
    (0, b"\xff\x4f\xff\x51", _other("JPEG 2000", "image")),
    (0, b"\x00\x00\x00\x0cjP  ", _other("JPEG 2000", "image")),
    (0, b"\xff\x0a", _other("JPEG XL", "image")),
    (0, b"\x00\x00\x00\x0cJXL ", _other("JPEG XL", "image")),
    (0, b"OggS", _other("Ogg", "file")),
    (0, b"fLaC", _other("FLAC", "audio file")),
    (0, b"ID3", _other("MP3", "audio file")),
    (0, b"\x1f\x8b", _other("gzip", "archive")),
    (0, b"7z\xbc\xaf\x27\x1c", _other("7z", "archive")),
    (0, b"Rar!", _other("RAR", "archive")),
)

# ISO base media (`ftyp` box) brands that are not MP4 video.
_FTYP_IMAGE_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC",
                      b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"mif1": "HEIF",
                      b"msf1": "HEIF"}
_FTYP_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P "}
# QuickTime files may start with one of these atoms instead of `ftyp`.
_QUICKTIME_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}
# BITMAPINFOHEADER sizes a real BMP has right after its 14-byte file header.
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


def sniff(data: bytes) -> MediaFormat | None:
    """The format of `data` (a whole file, or at least its first HEAD_BYTES), or None if unknown.

    PPT/PPTX need the whole file (their markers are in a ZIP directory or an OLE2 stream); from
    a head alone they come back as ZIP / OLE2.
    """
    head = bytes(data[:HEAD_BYTES])
    found = _container(head, data)
    if found is not None:
        return found
    for offset, magic, fmt in _MAGIC:
        if head.startswith(magic, offset):
            return _office(data, fmt) if fmt.name in ("ZIP", "OLE2") else fmt
    if head[:1024].find(b"%PDF-") >= 0:  # readers accept junk before the header
        return PDF
    if _is_mpeg_ts(head):
        return _video("MPEG-TS", "mpegts")
    if head.startswith((b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")):
        return _other("MP3", "audio file")
    return _text(head)


def _container(head: bytes, data: bytes) -> MediaFormat | None:
    """RIFF (AVI/WEBP/WAV), ISO base media (MP4/MOV/M4V/HEIF), Matroska/WEBM, BMP."""
    if head.startswith(b"RIFF") and len(head) >= 12:
        form = head[8:12]
        if form == b"WEBP":
            return _image("WEBP", "WEBP")
        if form in (b"AVI ", b"AVIX"):
            return _video("AVI", "avi")
        if form == b"WAVE":
            return _other("WAV", "audio file")
        return _other("RIFF", "file")
    box = head[4:8]
    if box == b"ftyp":
        brand = head[8:12]
        if brand in _FTYP_IMAGE_BRANDS:
            return _other(_FTYP_IMAGE_BRANDS[brand], "image")
        if brand in _FTYP_AUDIO_BRANDS:
            return _other("M4A", "audio file")
        if brand == b"qt  ":
            return _video("MOV", "mov")
        if brand.startswith(b"M4V"):
            return _video("M4V", "mov")
        return _video("MP4", "mov")
    if box in _QUICKTIME_ATOMS and len(head) >= 8:
        return _video("MOV", "mov")
    if head.startswith(b"\x1aE\xdf\xa3"):
        # The EBML header names its DocType within its first few dozen bytes.
        return _video("WEBM", "matroska") if b"webm" in head[:64] else None
    if head.startswith(b"BM") and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return _image("BMP", "BMP")
    return None


def _is_mpeg_ts(head: bytes) -> bool:
    """MPEG transport stream: a 0x47 sync byte every 188 bytes."""
    if not head.startswith(b"\x47"):
        return False
    packets = range(0, min(len(head), 188 * 5), 188)
    return len(packets) >= 2 and all(head[i] == 0x47 for i in packets)


def _office(data: bytes, container: MediaFormat) -> MediaFormat:
    """Tell PowerPoint (and other Office files) apart inside a ZIP or OLE2 container."""
    if container.name == "OLE2":
        # Stream names are stored in UTF-16LE in the OLE2 directory.
        for stream, fmt in (("PowerPoint Document", PPT), ("WordDocument", _other("DOC", "file")),
                            ("Workbook", _other("XLS", "file"))):
            if stream.encode("utf-16-le") in data:
                return fmt
        return container
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
            names = archive.namelist()  # reads the central directory only, nothing is extracted
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return container
    for prefix, fmt in (("ppt/", PPTX), ("word/", _other("DOCX", "file")),
                        ("xl/", _other("XLSX", "file"))):
        if any(name.startswith(prefix) for name in names):
            return fmt
    return container


def _text(head: bytes) -> MediaFormat | None:
    """Text that is clearly not media (an error page, a playlist), for a helpful message."""
    try:
        text = head.decode("utf-8").lstrip("\ufeff \t\r\n").lower()
    except UnicodeDecodeError:
        # A multi-byte character cut at HEAD_BYTES is still text.
        try:
            text = head[:-4].decode("utf-8").lstrip("\ufeff \t\r\n").lower()
        except UnicodeDecodeError:
            return None
    if text.startswith(("<!doctype html", "<html", "<head", "<body")):
        return _other("HTML", "page")
    if text.startswith("#extm3u"):
        return _other("HLS", "playlist")
    if text.startswith("<svg") or (text.startswith("<?xml") and "<svg" in text):
        return _other("SVG", "image")
    if text.startswith(("{", "[")):
        return _other("JSON", "text")
    if not text or all(c.isprintable() or c in "\t\r\n" for c in text[:512]):
        return _other("plain-text", "file")
    return None
