"""Shared inputs for the multimodal tests: real photographs, checkpoint configs, test videos."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from glmv.multimodal.processor_config import ImageProcessorConfig, VideoProcessorConfig

# `size` of the released GLM-4.1V / 4.5V / 4.6V processor files (pixel areas).
CHECKPOINT_IMAGE_SIZE = {"shortest_edge": 12544, "longest_edge": 9633792}
CHECKPOINT_VIDEO_SIZE = {"shortest_edge": 12544, "longest_edge": 47040000}

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "camera", "rocket")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photographs from scikit-image: RGB [H, W, 3] or grayscale [H, W] uint8."""
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the photographs")
    return {name: getattr(data, name)() for name in PHOTO_NAMES}


@pytest.fixture(scope="session")
def image_config() -> ImageProcessorConfig:
    return ImageProcessorConfig(
        min_pixels=CHECKPOINT_IMAGE_SIZE["shortest_edge"],
        max_pixels=CHECKPOINT_IMAGE_SIZE["longest_edge"],
    )


def video_config_for(flavour: str) -> VideoProcessorConfig:
    """Checkpoint video sizes; "glm4v" = GLM-4.1V/4.5V (fixed fps, integer timestamps),
    "glm46v" = GLM-4.6V (dynamic fps, "x.y seconds" timestamps)."""
    is_glm4v = flavour == "glm4v"
    return VideoProcessorConfig(
        min_pixels=CHECKPOINT_VIDEO_SIZE["shortest_edge"],
        max_pixels=CHECKPOINT_VIDEO_SIZE["longest_edge"],
        sampler="glm4v" if is_glm4v else "glm46v",
        timestamp_style="integer" if is_glm4v else "seconds",
    )


def gradient_frame(index: int, width: int, height: int) -> np.ndarray:
    """A colourful gradient that moves with `index`, so every frame differs. [H, W, 3] uint8."""
    y, x = np.mgrid[0:height, 0:width]
    channels = (
        (x * 4 + index * 7) % 256,
        (y * 5 + index * 3) % 256,
        ((x + y) * 2 + index * 11) % 256,
    )
    return np.stack(channels, axis=-1).astype(np.uint8)


WriteVideo = Callable[..., Path]


@pytest.fixture
def write_video(tmp_path: Path) -> WriteVideo:
    """Write a synthetic video with PyAV into tmp_path and return its path."""
    av = pytest.importorskip("av")

    def write(
        name: str,
        num_frames: int,
        fps: int,
        width: int = 64,
        height: int = 48,
        codec: str = "mpeg4",
        container_format: str | None = None,
    ) -> Path:
        path = tmp_path / name
        with av.open(str(path), mode="w", format=container_format) as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for index in range(num_frames):
                frame = av.VideoFrame.from_ndarray(
                    gradient_frame(index, width, height), format="rgb24"
                )
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        return path

    return write


def encode_image(image: PIL.Image.Image, fmt: str, **save_kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale [H, W] or RGB [H, W, 3]); Pillow cannot write 16-bit RGB itself."""
    height, width = array.shape[:2]
    color_type = 0 if array.ndim == 2 else 2

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
