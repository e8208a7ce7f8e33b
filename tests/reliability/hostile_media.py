"""A corpus of hostile media files, generated on the spot (nothing is stored in the repository).

Every item is built by a pure function from a fixed recipe (fixed seeds), so each run sends the
same bytes. An item says which content part carries it (image_url, video_url or file), the file
extension its local copy gets (for the `*_named_*` items, from `lying_extensions`, the extension
names another format: glmv must go by the bytes), and what glmv answers: a 4xx status with a
substring of the error message, or 200 where accepting the file is the right answer (animated
images give their first frame, a JPEG with damaged scan data decodes with artefacts as libjpeg
does) -- those must still be quick and small in memory.

The generators keep the test process small too: the 400-megapixel PNG is written row by row with
zlib (48 KB on the wire), the 5,000-page PDF object by object, the 5,000-frame animations by
repeating one encoded frame. `corpus()` builds all of it in about a second.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
import PIL.Image

from tests.multimodal.media_helpers import minimal_office_zip

Part = Literal["image", "video", "document"]

#: The frames of the animated images (GIF, APNG, WEBP), and their width and height.
ANIMATION_FRAMES = 5000
ANIMATION_SIZE = 512
#: The pages of the long PDF (the server allows 32 by default, --max-document-pages).
PDF_PAGES = 5000


@dataclass(frozen=True)
class HostileItem:
    name: str
    data: bytes
    ext: str  # extension of the local copy, without the dot
    part: Part  # the content part that carries it
    status: int  # what glmv answers: 400 / 413, or 200 where accepting it is right
    expect: str  # a substring of the error message ("" for a 200)
    note: str = ""  # what the item is, for the summary

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.ext}"


# ---------------------------------------------------------------------------------- helpers


def _noise_image(width: int = 200, height: int = 150) -> PIL.Image.Image:
    """Incompressible pixels: a cut anywhere lands in the pixel data."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def _encode(image: PIL.Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _flip(data: bytes, start: int, end: int) -> bytes:
    """`data` with every bit of bytes [start, end) inverted."""
    damaged = bytearray(data)
    for index in range(start, end):
        damaged[index] ^= 0xFF
    return bytes(damaged)


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def _png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _zeros_stream(rows: int, row_bytes: int) -> bytes:
    """zlib data of `rows` PNG scanlines of zeros (filter byte + row), compressed row by row:
    the expanded size is never in memory."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + row_bytes)
    return b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()


def _video(rate: int, frames: int, codec: str = "mpeg4",
           pts: list[int] | None = None, options: dict[str, str] | None = None) -> bytes:
    """A 64x48 MP4; `pts` (in 1/rate s) places the frames, `options` go to the muxer (through
    a temporary file: faststart rewrites the file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/clip.mp4"
        _write_video(path, rate, frames, codec, pts, options)
        with open(path, "rb") as file:
            return file.read()


def _write_video(path: str, rate: int, frames: int, codec: str, pts: list[int] | None,
                 options: dict[str, str] | None) -> None:
    import av

    with av.open(path, mode="w", format="mp4", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(frames):
            pixels = np.full((48, 64, 3), (index * 40 % 256, 90, 200), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[index], Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _pdf(num_pages: int) -> bytes:
    """A valid PDF of `num_pages` empty pages, written object by object (no PDF library)."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(num_pages))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{kids}] /Count {num_pages} >>".encode()]
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>"] * num_pages
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n"
            "%%EOF\n").encode()
    return bytes(out)


def _real_pdf(**save_options: object) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=200, height=200)
    page.insert_text((20, 40), "secret", fontsize=24)
    data: bytes = doc.tobytes(**save_options)
    doc.close()
    return data


# ---------------------------------------------------------------------------------- images


def truncated_image(fmt: str) -> HostileItem:
    """The first half of a PNG / JPEG / GIF / WEBP: the header is whole, the pixels are not."""
    data = _encode(_noise_image(), fmt)
    expect = ("could not create decoder" if fmt == "WEBP" else "truncated")
    return HostileItem(f"truncated_{fmt.lower()}", data[: len(data) // 2], fmt.lower(), "image",
                       400, expect, "first half of the file")


def corrupt_image(fmt: str) -> HostileItem:
    """A PNG / JPEG / GIF / WEBP with inverted bytes where the format cannot recover:

    PNG, JPEG, WEBP: the header right after the magic number (PNG's IHDR, JPEG's APP0/DQT,
    WEBP's VP8 frame header); GIF: the LZW-compressed pixels (a damaged GIF header only changes
    colours, which decodes fine).
    """
    data = _encode(_noise_image(), fmt)
    if fmt == "GIF":
        return HostileItem("corrupt_gif", _flip(data, len(data) // 3, len(data) // 3 + 64), "gif",
                           "image", 400, "truncated or corrupt", "LZW data inverted")
    return HostileItem(f"corrupt_{fmt.lower()}", _flip(data, 12, 40), fmt.lower(), "image", 400,
                       f"starts like a {fmt} image but its header is damaged",
                       "header bytes 12-40 inverted")


def jpeg_damaged_scan() -> HostileItem:
    """A JPEG whose entropy-coded data is damaged: libjpeg decodes it with artefacts (as every
    viewer does), so glmv accepts it -- quickly."""
    data = _encode(_noise_image(), "JPEG", quality=90)
    return HostileItem("jpeg_damaged_scan", _flip(data, len(data) // 3, len(data) // 3 + 64),
                       "jpg", "image", 200, "", "scan data inverted: decodes with artefacts")


def png_bomb_header() -> HostileItem:
    """A PNG whose IHDR (valid CRC) claims 100,000 x 100,000 pixels, with no pixel data."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")
    return HostileItem("png_bomb_header", data, "png", "image", 413,
                       "10,000,000,000 pixels, more than the limit of 50,000,000",
                       "IHDR claims 10 gigapixels")


def png_zlib_bomb() -> HostileItem:
    """A complete, valid 20,000 x 20,000 PNG of zeros (1-bit grey): 48 KB that expand to 400
    million pixels (about 1.2 GB as RGB); refused from its header, before inflating."""
    data = _png(20_000, 20_000, 1, 0, _zeros_stream(20_000, 20_000 // 8))
    return HostileItem("png_zlib_bomb", data, "png", "image", 413,
                       "400,000,000 pixels, more than the limit of 50,000,000",
                       "valid 400-megapixel PNG, 48 KB")


def png_excess_idat() -> HostileItem:
    """A 64 x 64 PNG whose IDAT inflates to 19 MB (100,000 scanlines for 64): the decoder
    stops when the image is full, so this is a fine 64 x 64 image."""
    data = _png(64, 64, 8, 2, _zeros_stream(100_000, 64 * 3))
    return HostileItem("png_excess_idat", data, "png", "image", 200, "",
                       "IDAT 1,500x longer than the image")


def gif_bomb_header() -> HostileItem:
    """A GIF whose logical screen and image claim 65,535 x 65,535 pixels."""
    screen = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x80\x00\x00" + bytes(6)
    image = b"," + struct.pack("<HHHH", 0, 0, 65535, 65535) + b"\x00\x02\x02\x44\x01\x00"
    return HostileItem("gif_bomb_header", screen + image + b";", "gif", "image", 413,
                       "4,294,836,225 pixels, more than the limit",
                       "header claims 4.3 gigapixels")


def animated_image(fmt: str, frames: int = ANIMATION_FRAMES,
                   size: int = ANIMATION_SIZE) -> HostileItem:
    """An animated GIF / APNG / WEBP of `frames` frames of size x size pixels.

    glmv takes the first frame (as transformers' load_image does) without decoding the others:
    a 200, quickly. Seeking through every frame takes Pillow seconds (measured for these 5,000
    frames of 512 x 512: GIF ~5 s, APNG ~1 s, WEBP ~2 s), and keeping them as RGB would take
    3.9 GB. The files are assembled by hand from one encoded frame repeated, so they stay
    small (GIF 4.5 MB, APNG 0.5 MB, WEBP 0.3 MB).
    """
    build = {"GIF": _animated_gif, "PNG": _animated_png, "WEBP": _animated_webp}[fmt]
    ext = {"PNG": "apng", "GIF": "gif", "WEBP": "webp"}[fmt]
    return HostileItem(f"animated_{ext}", build(frames, size), ext, "image", 200, "",
                       f"{frames:,} frames of {size}x{size}: the first one is used")


def _animated_gif(frames: int, size: int) -> bytes:
    """Header and palette + loop extension + `frames` x (control extension + the image block
    of one solid-colour frame Pillow encoded)."""
    still = _encode(PIL.Image.new("RGB", (size, size), (250, 30, 30)), "GIF")
    flags = still[10]
    pos = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)  # after the global palette
    head, image = still[:pos], b""
    while still[pos] != 0x3B:  # ';' ends the file
        start = pos
        if still[pos] == 0x21:  # '!' extension: label, then data sub-blocks
            pos += 2
        else:  # ',' image descriptor (+ local palette), LZW code size, then data sub-blocks
            local = still[pos + 9]
            pos += 10 + ((3 << ((local & 7) + 1)) if local & 0x80 else 0) + 1
        while still[pos]:
            pos += still[pos] + 1
        pos += 1
        if still[start] == 0x2C:
            image = still[start:pos]
    loop = b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    control = b"!\xf9\x04\x00\x01\x00\x00\x00"  # 10 ms a frame
    return head + loop + (control + image) * frames + b";"


def _animated_png(frames: int, size: int) -> bytes:
    """An APNG of 1-bit grey frames: acTL, then fcTL + IDAT for the first frame and fcTL +
    fdAT (the same zlib data) for every other one."""
    pixels = _zeros_stream(size, size // 8)
    header = struct.pack(">IIBBBBB", size, size, 1, 0, 0, 0, 0)
    chunks = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header),
              _png_chunk(b"acTL", struct.pack(">II", frames, 0))]
    sequence = 0
    for index in range(frames):
        control = struct.pack(">IIIIIHHBB", sequence, size, size, 0, 0, 1, 100, 0, 0)
        chunks.append(_png_chunk(b"fcTL", control))
        sequence += 1
        if index == 0:
            chunks.append(_png_chunk(b"IDAT", pixels))
        else:
            chunks.append(_png_chunk(b"fdAT", struct.pack(">I", sequence) + pixels))
            sequence += 1
    chunks.append(_png_chunk(b"IEND", b""))
    return b"".join(chunks)


def _animated_webp(frames: int, size: int) -> bytes:
    """RIFF WEBP: VP8X (animation flag) + ANIM + `frames` ANMF chunks, each holding the VP8L
    bitstream of one solid-colour frame Pillow encoded."""
    still = _encode(PIL.Image.new("RGB", (size, size), (30, 30, 250)), "WEBP", lossless=True)
    assert still[12:16] == b"VP8L"
    bitstream = still[12:]  # the VP8L chunk, header included

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return tag + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) % 2)

    def u24(value: int) -> bytes:
        return struct.pack("<I", value)[:3]

    side = u24(size - 1)
    body = (b"WEBP" + chunk(b"VP8X", b"\x02\x00\x00\x00" + side + side)
            + chunk(b"ANIM", b"\xff\xff\xff\xff" + struct.pack("<H", 0))
            + chunk(b"ANMF", u24(0) + u24(0) + side + side + u24(10) + b"\x00" + bitstream)
            * frames)
    return b"RIFF" + struct.pack("<I", len(body)) + body


# ---------------------------------------------------------------------------------- videos


def mp4_zero_frames() -> HostileItem:
    """An MP4 with a video track that holds no sample (FFmpeg drops the empty track)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # header and an empty moov, no frame
    return HostileItem("mp4_zero_frames", buffer.getvalue(), "mp4", "video", 400,
                       "has no video stream", "empty track")


def mp4_truncated() -> HostileItem:
    """The first half of an MP4 whose index (moov) comes last: the index is gone."""
    data = _video(10, 20)
    return HostileItem("mp4_truncated", data[: len(data) // 2], "mp4", "video", 400,
                       "not a readable video file", "first half, moov lost")


def mp4_truncated_faststart() -> HostileItem:
    """An MP4 with its index first (faststart) cut after the index: every frame it lists is
    missing."""
    data = _video(10, 20, options={"movflags": "faststart"})
    moov = data.find(b"moov") - 4
    size = struct.unpack(">I", data[moov: moov + 4])[0]
    return HostileItem("mp4_truncated_faststart", data[: moov + size + 16], "mp4", "video", 400,
                       "no decodable frames", "index whole, frames cut")


def mp4_corrupt() -> HostileItem:
    """An MP4 whose index (moov) is overwritten with inverted bytes."""
    data = _video(10, 20)
    moov = data.find(b"moov")
    return HostileItem("mp4_corrupt", _flip(data, moov + 4, moov + 200), "mp4", "video", 400,
                       "has no video stream", "moov inverted: FFmpeg finds no track")


def mp4_absurd_fps() -> HostileItem:
    """An MP4 whose stream claims 5,000 frames per second."""
    return HostileItem("mp4_absurd_fps", _video(5000, 4, codec="libx264"), "mp4", "video", 400,
                       "reports 5000 frames per second", "5,000 fps")


def mp4_absurd_duration() -> HostileItem:
    """A two-frame MP4 whose second frame is shown 40,000 s after the first (11 hours)."""
    return HostileItem("mp4_absurd_duration", _video(1, 2, pts=[0, 40_000]), "mp4", "video",
                       413, "longer than the limit of 3600 s (--max-video-seconds)",
                       "2 frames, 11 hours")


# ---------------------------------------------------------------------------------- documents


def pdf_encrypted() -> HostileItem:
    """A one-page PDF that needs a password to open (AES-256)."""
    import pymupdf

    data = _real_pdf(encryption=pymupdf.mupdf.PDF_ENCRYPT_AES_256, owner_pw="owner",
                     user_pw="user")
    return HostileItem("pdf_encrypted", data, "pdf", "document", 400, "encrypted",
                       "AES-256, user password")


def pdf_corrupt() -> HostileItem:
    """A PDF header followed by no PDF structure at all."""
    data = b"%PDF-1.7\n" + bytes(range(256)) * 16
    return HostileItem("pdf_corrupt", data, "pdf", "document", 400,
                       "cannot read the PDF: the data is damaged",
                       "header, then 4 KB of junk")


def pdf_many_pages(pages: int = PDF_PAGES) -> HostileItem:
    """A valid PDF of `pages` empty pages (513 KB for 5,000), refused from its page count."""
    return HostileItem(f"pdf_{pages}_pages", _pdf(pages), "pdf", "document", 413,
                       f"{pages} pages, more than the limit", f"{pages:,} empty pages")


# ---------------------------------------------------------------------------------- lying names


def _docx() -> bytes:
    return minimal_office_zip("word/document.xml", "<w:document/>")


def lying_extensions() -> list[HostileItem]:
    """Files whose extension (and the part that carries them) claim another format."""
    png = _encode(_noise_image(64, 48), "PNG")
    return [
        HostileItem("pdf_named_png", _real_pdf(), "png", "image", 400,
                    "holds a PDF document, not an image", "a PDF as image_url"),
        HostileItem("mp4_named_jpg", _video(10, 4), "jpg", "image", 400,
                    "holds an MP4 video, not an image", "an MP4 as image_url"),
        HostileItem("html_named_png", b"<!DOCTYPE html><html><body>404</body></html>\n", "png",
                    "image", 400, "holds an HTML page, which is not a supported format",
                    "an error page"),
        HostileItem("svg_named_png", b'<svg xmlns="http://www.w3.org/2000/svg"><image '
                    b'href="http://169.254.169.254/"/></svg>', "png", "image", 400,
                    "holds an SVG image, which is not a supported format", "SVG with a URL"),
        HostileItem("elf_named_jpg", b"\x7fELF\x02\x01\x01" + bytes(57) + bytes(range(256)),
                    "jpg", "image", 400, "not a supported image/video/document format",
                    "an executable"),
        HostileItem("png_named_mp4", png, "mp4", "video", 400, "holds a PNG image, not a video",
                    "a PNG as video_url"),
        HostileItem("docx_named_pdf", _docx(), "pdf", "document", 400,
                    "holds a DOCX file, which is not a supported format", "Word file as PDF"),
        HostileItem("text_named_pdf", b"just some text, not a PDF\n" * 20, "pdf", "document",
                    400, "holds a plain-text file", "text as PDF"),
        HostileItem("mp4_named_pdf", _video(10, 4), "pdf", "document", 400,
                    "holds an MP4 video, not a document", "an MP4 as file part"),
    ]


# ---------------------------------------------------------------------------------- the corpus

CORPUS: tuple[Callable[[], list[HostileItem]], ...] = (
    lambda: [truncated_image(fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP")],
    lambda: [corrupt_image(fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP")],
    lambda: [jpeg_damaged_scan(), png_bomb_header(), png_zlib_bomb(), png_excess_idat(),
             gif_bomb_header()],
    lambda: [animated_image(fmt) for fmt in ("GIF", "PNG", "WEBP")],
    lambda: [mp4_zero_frames(), mp4_truncated(), mp4_truncated_faststart(), mp4_corrupt(),
             mp4_absurd_fps(), mp4_absurd_duration()],
    lambda: [pdf_encrypted(), pdf_corrupt(), pdf_many_pages()],
    lying_extensions,
)


def corpus() -> list[HostileItem]:
    """Every hostile item, in a fixed order."""
    return [item for build in CORPUS for item in build()]


# ---------------------------------------------------------------------------------- valid media


def valid_media() -> dict[str, bytes]:
    """Small valid files ("png", "mp4", "pdf"): the warm-up before measuring memory, and the
    proof afterwards that the server still decodes media."""
    return {"png": _encode(_noise_image(64, 48), "PNG"), "mp4": _video(10, 8),
            "pdf": _real_pdf()}
