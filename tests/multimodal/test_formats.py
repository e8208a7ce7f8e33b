"""Every accepted image and video format through the processor, by data URL and by path; the format
comes from the bytes (magic numbers), never from a file name or a data URL's MIME type."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import PIL.Image
import pytest
import torch

from glmv.errors import ImageError, MediaError, VideoError
from glmv.multimodal.image import load_image, process_image
from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import MultiModalProcessor
from glmv.multimodal.sniff import PPT, PPTX, sniff
from glmv.multimodal.video import decode_video, process_video
from tests.multimodal.media_helpers import (
    IMAGE_FORMATS,
    VIDEO_FORMATS,
    data_url,
    encode,
    make_pdf,
    minimal_pptx,
    picture,
    processor,
    write_video,
)


@pytest.fixture
def proc(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> MultiModalProcessor:
    return processor(tiny_checkpoint("glm-4.6v"),
                     MediaPolicy(allowed_local_paths=(str(tmp_path),)))


def chat_image(proc: MultiModalProcessor, url: str) -> torch.Tensor:
    result = proc.process_chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}])
    (item,) = result.mm_items
    return item.pixel_values


@pytest.mark.parametrize(("name", "fmt", "options"), IMAGE_FORMATS)
def test_every_image_format(proc: MultiModalProcessor, tmp_path: Path, name: str, fmt: str,
                            options: dict[str, object]) -> None:
    data = encode(picture(), fmt, **options)
    assert sniff(data) is not None and sniff(data).name == name  # type: ignore[union-attr]
    expected = process_image(load_image(data), proc.image_config).pixel_values
    path = tmp_path / "picture.mp4"  # the extension lies; the bytes decide
    path.write_bytes(data)
    # The MIME type lies too.
    for source in (data_url(data, "video/mp4"), str(path), path.as_uri()):
        assert torch.equal(proc.preprocess_image(source).pixel_values, expected), source
        assert torch.equal(chat_image(proc, source), expected)


def test_animated_gif_gives_its_first_frame(proc: MultiModalProcessor) -> None:
    frames = [PIL.Image.new("RGB", (40, 30), color) for color in
              ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100,
                  loop=0)
    assert PIL.Image.open(io.BytesIO(data)).n_frames == 3
    ours = proc.preprocess_image(data_url(data))
    assert torch.equal(ours.pixel_values, process_image(frames[0], proc.image_config).pixel_values)


@pytest.mark.parametrize(("name", "container", "codec", "rate"), VIDEO_FORMATS,
                         ids=[f"{c}-{k}" for _, c, k, _ in VIDEO_FORMATS])
def test_every_video_format(proc: MultiModalProcessor, tmp_path: Path, name: str,
                            container: str, codec: str, rate: int) -> None:
    data = write_video(container, codec, rate)
    fmt = sniff(data)
    assert fmt is not None and fmt.name == name and fmt.kind == "video"
    expected = process_video(decode_video(data, proc.video_config), proc.video_config)
    path = tmp_path / "clip.png"  # a lying extension
    path.write_bytes(data)
    for source in (data_url(data, "image/png"), str(path)):
        video = proc.preprocess_video(source)
        assert video.frame_indices == expected.frame_indices
        assert torch.equal(video.pixel_values, expected.pixel_values)
    result = proc.process_chat([{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": path.as_uri()}}]}])
    assert [item.modality for item in result.mm_items] == ["video"]


# ------------------------------------------------------------------ the wrong kind of media


def image_part(url: str) -> list[dict[str, object]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def video_part(url: str) -> list[dict[str, object]]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}]


def test_image_part_holding_a_video_or_document(proc: MultiModalProcessor) -> None:
    mp4 = write_video("mp4", "mpeg4", 10, num_frames=2)
    with pytest.raises(ImageError, match="holds an MP4 video, not an image; send videos as "
                                         "video_url parts"):
        proc.process_chat(image_part(data_url(mp4, "image/png")))
    pdf = make_pdf([(100, 100, (1, 0, 0))])
    with pytest.raises(ImageError, match=r"holds a PDF document, not an image; send documents "
                                         r"as \{\"type\": \"file\""):
        proc.process_chat(image_part(data_url(pdf, "image/jpeg")))


def test_video_part_holding_an_image(proc: MultiModalProcessor, tmp_path: Path) -> None:
    png = encode(picture(), "PNG")
    with pytest.raises(VideoError, match="holds a PNG image, not a video; send images as "
                                         "image_url parts"):
        proc.process_chat(video_part(data_url(png, "video/mp4")))
    path = tmp_path / "clip.mp4"
    path.write_bytes(png)
    with pytest.raises(VideoError, match="holds a PNG image") as info:
        proc.process_chat(video_part(str(path)))  # a local file is sniffed from its head
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("data", "what"), [
    (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "an HTML page"),
    (b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n", "an HLS playlist"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "a WAV audio file"),
    (b"ID3\x04\x00\x00\x00\x00\x00\x00", "an MP3 audio file"),
])
def test_recognised_but_unsupported(proc: MultiModalProcessor, data: bytes, what: str) -> None:
    for messages, error in ((image_part(data_url(data)), ImageError),
                            (video_part(data_url(data)), VideoError)):
        with pytest.raises(error, match=f"holds {what}, which is not a supported format"):
            proc.process_chat(messages)


def test_unknown_bytes(proc: MultiModalProcessor) -> None:
    junk = bytes(range(7, 250)) * 3
    with pytest.raises(ImageError, match="cannot decode image: the data is not a supported "
                                         "image/video/document format"):
        proc.process_chat(image_part(data_url(junk)))
    with pytest.raises(VideoError, match="cannot decode video: the data is not a supported "
                                         "image/video/document format") as info:
        proc.process_chat(video_part(data_url(junk)))
    assert "videos: MP4, M4V, MOV, AVI, MKV, WEBM, WMV, FLV, MPEG" in str(info.value)


def test_image_bytes_given_directly_are_sniffed(proc: MultiModalProcessor) -> None:
    with pytest.raises(ImageError, match="holds a PDF document"):
        proc.preprocess_image(make_pdf([(100, 100, (0, 0, 1))]))
    with pytest.raises(VideoError, match="holds a PNG image"):
        proc.preprocess_video(encode(picture(), "PNG"))


def test_truncated_image_of_a_known_format(proc: MultiModalProcessor) -> None:
    data = encode(picture(200, 150), "PNG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        proc.preprocess_image(data_url(data[: len(data) // 2]))


# ------------------------------------------------------------------ the sniffer itself


@pytest.mark.parametrize(("data", "kind", "name"), [
    (b"\xff\xd8\xff\xe0" + bytes(20), "image", "JPEG"),
    (b"\x89PNG\r\n\x1a\n" + bytes(20), "image", "PNG"),
    (b"GIF87a" + bytes(20), "image", "GIF"), (b"GIF89a" + bytes(20), "image", "GIF"),
    (b"BM" + bytes(12) + b"\x28\x00\x00\x00" + bytes(20), "image", "BMP"),
    (b"II*\x00" + bytes(20), "image", "TIFF"), (b"MM\x00*" + bytes(20), "image", "TIFF"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image", "WEBP"),
    (b"\x00\x00\x00\x18ftypmp42" + bytes(20), "video", "MP4"),
    (b"\x00\x00\x00\x18ftypqt  " + bytes(20), "video", "MOV"),
    (b"\x00\x00\x00\x08wide\x00\x00\x00\x00mdat", "video", "MOV"),
    (b"\x00\x00\x00\x18ftypM4V " + bytes(20), "video", "M4V"),
    (b"RIFF\x00\x00\x00\x00AVI LIST", "video", "AVI"),
    (b"\x00\x00\x01\xba" + bytes(20), "video", "MPEG"),
    (b"\x00\x00\x01\xb3" + bytes(20), "video", "MPEG"),
    (b"%PDF-1.7\n" + bytes(20), "document", "PDF"),
    (b"garbage first\n%PDF-1.4\n", "document", "PDF"),
    (b"\x00\x00\x00\x18ftypavif" + bytes(20), "unsupported", "AVIF"),
    (b"\x00\x00\x00\x18ftypheic" + bytes(20), "unsupported", "HEIC"),
    (b"\x00\x00\x01\x00\x01\x00", "unsupported", "ICO"),
    (b"BMnot really a bitmap, just text", "unsupported", "plain-text"),
    (b'{"error": "not found"}', "unsupported", "JSON"),
])
def test_magic_numbers(data: bytes, kind: str, name: str) -> None:
    fmt = sniff(data)
    assert fmt is not None and (fmt.kind, fmt.name) == (kind, name)


def test_office_files_are_told_apart() -> None:
    assert sniff(minimal_pptx()) == PPTX
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100) + "PowerPoint Document".encode(
        "utf-16-le")
    assert sniff(ole) == PPT
    word = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + "WordDocument".encode("utf-16-le")
    assert sniff(word) is not None and sniff(word).name == "DOC"  # type: ignore[union-attr]
    assert sniff(b"PK\x03\x04 not a real zip").name == "ZIP"  # type: ignore[union-attr]
    assert sniff(b"\x00\x01\x02\x03\xfe\xfd") is None


def test_other_office_documents_are_refused(proc: MultiModalProcessor) -> None:
    word = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + "WordDocument".encode("utf-16-le")
    with pytest.raises(MediaError, match="holds a DOC file, which is not a supported format"):
        proc.process_chat([{"role": "user", "content": [
            {"type": "file", "file": {"file_data": data_url(word), "filename": "x.pdf"}}]}])
