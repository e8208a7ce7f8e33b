"""Helpers of the media tests: processors under a given MediaPolicy, tiny media of every format."""

from __future__ import annotations

import base64
import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image

from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import MultiModalProcessor
from tests.multimodal.conftest import gradient_frame

_BASE: dict[Path, MultiModalProcessor] = {}

#: (name, PIL format, save options) of every image format glmv accepts.
IMAGE_FORMATS = [
    ("JPEG", "JPEG", {"quality": 90}), ("PNG", "PNG", {}), ("GIF", "GIF", {}),
    ("BMP", "BMP", {}), ("TIFF", "TIFF", {}), ("WEBP", "WEBP", {"lossless": True}),
]
#: (sniffed name, PyAV container format, codec, frame rate) of every video format glmv accepts.
VIDEO_FORMATS = [
    ("MP4", "mp4", "libx264", 10), ("MP4", "mp4", "mpeg4", 10), ("M4V", "ipod", "libx264", 10),
    ("MOV", "mov", "mpeg4", 10), ("AVI", "avi", "mpeg4", 10), ("MKV", "matroska", "mpeg4", 10),
    ("WEBM", "webm", "libvpx", 10), ("WEBM", "webm", "libvpx-vp9", 10),
    ("WMV", "asf", "wmv2", 10), ("FLV", "flv", "flv", 10), ("MPEG", "mpeg", "mpeg1video", 25),
    ("MPEG", "mpeg", "mpeg2video", 10), ("MPEG", "mpeg1video", "mpeg1video", 25),  # PS, ES
    ("MPEG-TS", "mpegts", "mpeg2video", 10),
]


def processor(checkpoint: Path, policy: MediaPolicy) -> MultiModalProcessor:
    """The checkpoint's processor with `policy` (tokenizer and configs loaded once)."""
    if checkpoint not in _BASE:
        _BASE[checkpoint] = MultiModalProcessor.from_pretrained(checkpoint)
    base = _BASE[checkpoint]
    return MultiModalProcessor(base.config, base.tokenizer, base.image_config, base.video_config,
                               policy)


def data_url(data: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def picture(width: int = 64, height: int = 48, index: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(gradient_frame(index, width, height))


def encode(image: PIL.Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_video(container_format: str, codec: str, rate: int, num_frames: int = 12,
                width: int = 64, height: int = 48) -> bytes:
    """A small synthetic video in memory, written with PyAV."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(gradient_frame(index, width, height),
                                               format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds no image data (a 'bomb' header)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def minimal_office_zip(part: str, xml: str) -> bytes:
    """A ZIP with [Content_Types].xml and one `part` of an Office document, sniffed by that
    part's folder (ppt/, word/, ...) but no real document."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr(part, xml)
    return buffer.getvalue()


def minimal_pptx() -> bytes:
    """A ZIP that sniffs as PPTX (it has ppt/ entries) but is no real presentation."""
    return minimal_office_zip("ppt/presentation.xml", "<p:presentation/>")


def make_pdf(pages: list[tuple[float, float, tuple[float, float, float]]],
             **save_options: object) -> bytes:
    """A PDF with one page per (width, height in points, fill colour), each with its number."""
    import pymupdf

    doc = pymupdf.open()
    for number, (width, height, color) in enumerate(pages, start=1):
        page = doc.new_page(width=width, height=height)
        page.draw_rect(page.rect, color=color, fill=color)
        page.insert_text((20, 40), f"Page {number}", fontsize=24, color=(1, 1, 1))
    data: bytes = doc.tobytes(**save_options)
    doc.close()
    return data


def mean_color(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)


Factory = Callable[..., MultiModalProcessor]
