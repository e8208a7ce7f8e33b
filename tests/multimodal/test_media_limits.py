"""Size limits of images and videos (checked from headers, before decoding), video sampling
overrides from the policy, per-image resolution (`detail`, `min_pixels`, `max_pixels`), and the
items-per-request limit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from glmv.errors import ImageError, MediaTooLargeError, PromptError, VideoError
from glmv.multimodal import video as video_module
from glmv.multimodal.image import LOW_DETAIL_PIXELS, load_image, process_image
from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import MultiModalProcessor
from glmv.multimodal.video import VideoChecks, probe_video, sample_frames, sample_frames_glm46v
from tests.multimodal.media_helpers import (
    data_url,
    encode,
    make_pdf,
    picture,
    png_header,
    processor,
    write_video,
)

ProcFactory = Callable[..., MultiModalProcessor]


@pytest.fixture
def make(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> ProcFactory:
    """`make(variant="glm-4.6v", **policy_fields)` -> a processor; tmp_path is allowed."""

    def build(variant: str = "glm-4.6v", **fields: Any) -> MultiModalProcessor:
        policy = MediaPolicy(allowed_local_paths=(str(tmp_path),), **fields)
        return processor(tiny_checkpoint(variant), policy)

    return build


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]


def image_url(url: str, **options: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **options}}


# ------------------------------------------------------------------ image pixels


def test_bomb_header_is_refused_without_decoding(make: ProcFactory) -> None:
    proc = make()
    for width, height in ((100_000, 100_000), (8000, 8000)):
        with pytest.raises(MediaTooLargeError, match="--max-image-pixels") as info:
            proc.process_chat(user(image_url(data_url(png_header(width, height)))))
        assert info.value.http_status == 413
    # The header holds no pixel data at all: decoding would have failed with "truncated".
    assert "8000x8000 = 64,000,000 pixels, more than the limit of 50,000,000" in str(info.value)


def test_an_image_too_big_for_the_context_is_refused_before_decoding(make: ProcFactory) -> None:
    proc = make()
    proc.max_prompt_tokens = 64  # as the engine sets it from max_model_len
    # A header alone (no pixel data): the refusal must come before decoding would fail.
    with pytest.raises(PromptError, match=r"fills [\d,]+ tokens, more than .* of 64 ") as info:
        proc.process_chat(user(image_url(data_url(png_header(2000, 1500)))))
    assert "1500x2000" in str(info.value) or "2000x1500" in str(info.value)
    # A small image fits and is decoded as usual.
    small = data_url(encode(picture(64, 48), "PNG"))
    assert proc.process_chat(user(image_url(small))).num_image_tokens < 64


def test_pixel_limit_is_exact(make: ProcFactory) -> None:
    proc = make(max_image_pixels=64 * 48)
    assert proc.preprocess_image(data_url(encode(picture(64, 48), "PNG"))).original_size == (48, 64)
    with pytest.raises(MediaTooLargeError, match="65x48 = 3,120 pixels"):
        proc.preprocess_image(data_url(encode(picture(65, 48), "JPEG")))
    with pytest.raises(MediaTooLargeError, match="--max-image-pixels"):
        load_image(png_header(100, 100), max_pixels=9999)


# ------------------------------------------------------------------ video limits


def clip(container: str = "mp4", codec: str = "mpeg4", rate: int = 10, frames: int = 30) -> str:
    return data_url(write_video(container, codec, rate, num_frames=frames))


def video_url(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


@pytest.mark.parametrize("container", ["mp4", "matroska"])  # frame count in header / counted
def test_video_limits_from_metadata(make: ProcFactory, container: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url = clip(container)  # 30 frames at 10 fps: 3 s
    assert make(max_video_frames=30, max_video_seconds=3.0).preprocess_video(url).grid_thw[0] > 0

    def no_decoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("frames were decoded before the limits were checked")

    monkeypatch.setattr(video_module, "_decode_indices", no_decoding)
    with pytest.raises(MediaTooLargeError, match="30 frames, more than the limit of 29") as info:
        make(max_video_frames=29).process_chat(user(video_url(url)))
    assert "--max-video-frames" in str(info.value) and info.value.http_status == 413
    with pytest.raises(MediaTooLargeError, match=r"lasts 3\.0 s, longer than the limit of 2\.5 s"):
        make(max_video_seconds=2.5).preprocess_video(url)


def test_absurd_frame_rate(make: ProcFactory) -> None:
    with pytest.raises(VideoError, match="reports 5000 frames per second"):
        make().preprocess_video(clip(codec="libx264", rate=5000, frames=4))
    data = write_video("mp4", "mpeg4", 10, num_frames=4)
    with pytest.raises(VideoError, match="at most 5"):
        probe_video(data, VideoChecks(max_fps=5))


# ------------------------------------------------------------------ sampling overrides


@pytest.mark.parametrize(("variant", "fields", "indices"), [
    ("glm-4.5v", {}, [0, 5, 10, 15, 20, 25]),  # Glm4vVideoProcessor: 2 fps
    ("glm-4.5v", {"video_fps": 1.0}, [0, 10, 20, 20]),
    ("glm-4.5v", {"video_num_frames": -1}, [0, 5, 10, 15, 20, 25]),  # vLLM's "the sampler's"
    ("glm-4.6v", {}, [0, 2, 4, 5, 7, 9, 10, 12, 14, 15, 17, 19, 20, 22, 24, 25, 27, 29]),
    ("glm-4.6v", {"video_fps": 2.0}, [0, 5, 10, 15, 20, 25]),
    ("glm-4.6v", {"video_num_frames": 4}, [0, 9, 19, 29]),
    ("glm-4.5v", {"video_num_frames": 5}, [0, 7, 14, 21, 29, 29]),
    ("glm-4.6v", {"video_num_frames": 100}, list(range(30))),
])
def test_policy_sampling_overrides(make: ProcFactory, variant: str, fields: dict[str, Any],
                                   indices: list[int]) -> None:
    video = make(variant, **fields).preprocess_video(clip())
    assert video.frame_indices == indices
    assert video.grid_thw[0] == len(indices) // 2


def test_explicit_fps_wins_over_the_policy(make: ProcFactory) -> None:
    proc = make("glm-4.5v", video_num_frames=4)
    assert proc.preprocess_video(clip(), fps=1.0).frame_indices == [0, 10, 20, 20]


def test_sampler_overrides_directly() -> None:
    metadata = video_module.VideoMetadata(300, 30.0, 10.0, 64, 48)
    # The default path is the official one, untouched by the new arguments.
    assert sample_frames_glm46v(metadata, 2) == sample_frames_glm46v(metadata, 2, None)
    assert len(sample_frames_glm46v(metadata, 2, fps=1.0)) == 10
    config = video_module.VideoProcessorConfig()
    with pytest.raises(VideoError, match="not both"):
        sample_frames(metadata, config, fps=1.0, num_frames=4)
    with pytest.raises(VideoError, match="num_frames must be >= 1"):
        sample_frames(metadata, config, num_frames=0)


# ------------------------------------------------------------------ per-image resolution


@pytest.fixture(scope="module")
def big() -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 1000, 3),
                                                                   dtype=np.uint8))


def one_image(proc: MultiModalProcessor, part: dict[str, Any]) -> Any:
    (item,) = proc.process_chat(user(part)).mm_items
    return item


def test_default_and_high_detail_keep_the_config(make: ProcFactory,
                                                 big: PIL.Image.Image) -> None:
    proc = make()
    expected = process_image(big, proc.image_config).pixel_values
    url = data_url(encode(big, "PNG"))
    for options in ({}, {"detail": "high"}, {"detail": "auto"}):
        assert torch.equal(one_image(proc, image_url(url, **options)).pixel_values, expected)


def test_low_detail(make: ProcFactory, big: PIL.Image.Image) -> None:
    proc = make()
    url = data_url(encode(big, "PNG"))
    default = one_image(proc, image_url(url))
    low = one_image(proc, image_url(url, detail="low"))
    _, h, w = low.grid_thw
    assert h * w * 14 * 14 <= LOW_DETAIL_PIXELS and low.num_embeds <= 256
    assert low.num_embeds < default.num_embeds
    # The option may sit at the part's top level too.
    top = one_image(proc, {**image_url(url), "detail": "low"})
    assert torch.equal(top.pixel_values, low.pixel_values)


def test_explicit_pixel_bounds(make: ProcFactory, big: PIL.Image.Image) -> None:
    proc = make()
    url = data_url(encode(big, "PNG"))
    capped = one_image(proc, image_url(url, max_pixels=100_000))
    _, h, w = capped.grid_thw
    assert h * w * 14 * 14 <= 100_000
    # An explicit bound wins over detail.
    roomy = one_image(proc, image_url(url, detail="low", max_pixels=400_000))
    assert roomy.num_embeds > one_image(proc, image_url(url, detail="low")).num_embeds
    small = encode(picture(40, 30), "PNG")
    grown = one_image(proc, {"type": "image", "image": data_url(small), "min_pixels": 200_000})
    _, h, w = grown.grid_thw
    assert h * w * 14 * 14 >= 200_000
    assert grown.original_size == (30, 40)


@pytest.mark.parametrize(("options", "match"), [
    ({"detail": "medium"}, "detail must be one of low, high, auto"),
    ({"max_pixels": 0}, "max_pixels must be a positive integer"),
    ({"max_pixels": True}, "max_pixels must be a positive integer"),
    ({"min_pixels": "1000"}, "min_pixels must be a positive integer"),
    ({"min_pixels": 5000, "max_pixels": 4000}, r"min_pixels \(5,000\) is larger"),
    ({"max_pixels": 5_000_000}, "above this model's largest image, 4,816,896 pixels"),
])
def test_bad_pixel_bounds(make: ProcFactory, tmp_path: Path, options: dict[str, Any],
                          match: str) -> None:
    # Checked before anything is fetched: the first image does not even exist.
    missing = str(tmp_path / "missing.png")
    url = data_url(encode(picture(), "PNG"))
    with pytest.raises(ImageError, match=match):
        make().process_chat(user(image_url(missing), image_url(url, **options)))


def test_the_same_option_twice(make: ProcFactory) -> None:
    url = data_url(encode(picture(), "PNG"))
    with pytest.raises(ImageError, match="gives detail twice"):
        make().process_chat(user({**image_url(url, detail="low"), "detail": "high"}))
    same = {**image_url(url, detail="low"), "detail": "low"}
    assert len(make().process_chat(user(same)).mm_items) == 1


# ------------------------------------------------------------------ items per request


def test_items_per_request_are_counted_before_fetching(make: ProcFactory, tmp_path: Path) -> None:
    missing = [image_url(str(tmp_path / f"{i}.png")) for i in range(3)]
    with pytest.raises(PromptError, match="3 images, more than the 2 allowed") as info:
        make(limit_per_prompt={"image": 2}).process_chat(user(*missing))
    assert "--limit-mm-per-prompt" in str(info.value)
    with pytest.raises(PromptError, match="does not accept videos"):
        make(limit_per_prompt={"video": 0}).process_chat(user(video_url(str(tmp_path / "v"))))
    proc = make(limit_per_prompt={"image": 1})
    with pytest.raises(PromptError, match="2 images"):
        proc.process("<|begin_of_image|><|image|><|end_of_image|>" * 2,
                     images=[picture(), picture()])


def test_document_pages_do_not_count_as_images(make: ProcFactory) -> None:
    pdf = data_url(make_pdf([(200, 200, (1, 0, 0))] * 3))
    document = {"type": "file", "file": {"file_data": pdf, "filename": "three.pdf"}}
    photo = image_url(data_url(encode(picture(), "PNG")))
    proc = make(limit_per_prompt={"image": 1, "document": 1})
    result = proc.process_chat(user(document, photo))
    assert [item.modality for item in result.mm_items] == ["image"] * 4
    with pytest.raises(PromptError, match="2 documents, more than the 1 allowed"):
        proc.process_chat(user(document, document))
