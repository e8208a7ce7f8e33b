"""Processor settings: defaults and file parsing agree with transformers' processor classes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from glmv.errors import ConfigError
from glmv.multimodal.image import process_image
from glmv.multimodal.processor_config import (
    ImageProcessorConfig,
    VideoProcessorConfig,
    load_processor_configs,
)
from glmv.multimodal.video import VideoMetadata, process_frames
from tests.multimodal.conftest import gradient_frame

transformers = pytest.importorskip("transformers", reason="transformers is the reference")
from transformers import (  # noqa: E402
    Glm4vImageProcessor,
    Glm4vVideoProcessor,
    Glm46VImageProcessor,
    Glm46VVideoProcessor,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def checkpoint_image_file(processor_class: str) -> dict[str, Any]:
    """A preprocessor_config.json as the GLM-V checkpoints ship it."""
    return {
        "size": {"shortest_edge": 12544, "longest_edge": 9633792},
        "do_rescale": True,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "Glm4vImageProcessor",
        "processor_class": processor_class,
    }


def checkpoint_video_file(video_type: str, processor_class: str) -> dict[str, Any]:
    return {
        "size": {"shortest_edge": 12544, "longest_edge": 47040000},
        "do_rescale": True,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "video_processor_type": video_type,
        "processor_class": processor_class,
    }


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def assert_same_settings(ours: Any, hf: Any) -> None:
    assert ours.min_pixels == hf.size.shortest_edge
    assert ours.max_pixels == hf.size.longest_edge
    for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor"):
        assert getattr(ours, key) == getattr(hf, key), key
    assert ours.do_convert_rgb == hf.do_convert_rgb
    assert list(ours.image_mean) == list(hf.image_mean)
    assert list(ours.image_std) == list(hf.image_std)


def test_image_defaults_are_transformers_class_defaults() -> None:
    for cls in (Glm4vImageProcessor, Glm46VImageProcessor):
        assert_same_settings(ImageProcessorConfig(), cls())
    assert ImageProcessorConfig().max_pixels == 28 * 28 * 15000
    assert ImageProcessorConfig().factor == 28


def test_video_defaults_are_transformers_class_defaults() -> None:
    for cls in (Glm4vVideoProcessor, Glm46VVideoProcessor):
        hf = cls()
        ours = VideoProcessorConfig()
        assert_same_settings(ours, hf)
        assert (ours.fps, ours.max_duration) == (hf.fps, hf.max_duration)
    assert VideoProcessorConfig().max_pixels == 28 * 28 * 2 * 30000
    assert (VideoProcessorConfig().sampler, VideoProcessorConfig().timestamp_style) == (
        "glm4v",
        "integer",
    )


def test_from_dict_reads_what_transformers_reads() -> None:
    data = checkpoint_image_file("Glm4vProcessor")
    assert_same_settings(ImageProcessorConfig.from_dict(data), Glm4vImageProcessor.from_dict(data))
    video = checkpoint_video_file("Glm46VVideoProcessor", "Glm46VProcessor") | {"fps": 1}
    ours = VideoProcessorConfig.from_dict(video)
    hf = Glm46VVideoProcessor.from_dict(video)
    assert_same_settings(ours, hf)
    assert ours.fps == hf.fps == 1


def test_custom_settings_give_transformers_pixels() -> None:
    # Small budget and another normalisation, so every mapped field matters.
    data = {
        "size": {"shortest_edge": 28 * 28, "longest_edge": 2 * 56 * 84},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.5, 0.75],
        "rescale_factor": 1 / 127.5,
    }
    image = PIL.Image.fromarray(gradient_frame(3, 200, 150))
    ours = process_image(image, ImageProcessorConfig.from_dict(data))
    expected = Glm4vImageProcessor.from_dict(data)(images=[image], return_tensors="pt")
    assert [list(ours.grid_thw)] == expected["image_grid_thw"].tolist()
    assert torch.equal(ours.pixel_values, expected["pixel_values"])

    frames = np.stack([gradient_frame(i, 96, 72) for i in range(20)])
    metadata = VideoMetadata(20, 10.0, 2.0, 96, 72)
    video = data | {"fps": 3, "size": {"shortest_edge": 28 * 28, "longest_edge": 4 * 56 * 56}}
    processed = process_frames(frames, metadata, VideoProcessorConfig.from_dict(video), sample=True)
    outputs = Glm4vVideoProcessor.from_dict(video)(
        videos=[frames],
        video_metadata=[dataclasses.asdict(metadata)],
        do_sample_frames=True,
        return_tensors="pt",
    )
    assert [list(processed.grid_thw)] == outputs["video_grid_thw"].tolist()
    assert torch.equal(processed.pixel_values, outputs["pixel_values_videos"])


@pytest.mark.parametrize(
    ("video_type", "processor_class", "sampler", "style"),
    [
        ("Glm4vVideoProcessor", "Glm4vProcessor", "glm4v", "integer"),  # GLM-4.1V, 4.5V
        ("Glm46VVideoProcessor", "Glm46VProcessor", "glm46v", "seconds"),  # GLM-4.6V
        ("Glm4vVideoProcessor", "Glm46VProcessor", "glm4v", "seconds"),  # the prompt class wins
        ("Glm46VVideoProcessor", None, "glm46v", "seconds"),
        (None, None, "glm4v", "integer"),
    ],
)
def test_class_names_pick_sampler_and_timestamps(
    video_type: str | None, processor_class: str | None, sampler: str, style: str
) -> None:
    data: dict[str, Any] = {}
    if video_type:
        data["video_processor_type"] = video_type
    if processor_class:
        data["processor_class"] = processor_class
    config = VideoProcessorConfig.from_dict(data)
    assert (config.sampler, config.timestamp_style) == (sampler, style)


@pytest.mark.parametrize(
    ("video_type", "processor_class", "sampler", "style"),
    [
        ("Glm4vVideoProcessor", "Glm4vProcessor", "glm4v", "integer"),
        ("Glm46VVideoProcessor", "Glm46VProcessor", "glm46v", "seconds"),
    ],
)
def test_load_processor_configs_from_a_checkpoint_folder(
    tmp_path: Path, video_type: str, processor_class: str, sampler: str, style: str
) -> None:
    write_json(tmp_path / "preprocessor_config.json", checkpoint_image_file(processor_class))
    write_json(
        tmp_path / "video_preprocessor_config.json",
        checkpoint_video_file(video_type, processor_class),
    )
    image, video = load_processor_configs(tmp_path)
    assert (image.min_pixels, image.max_pixels) == (12544, 9633792)
    assert (video.min_pixels, video.max_pixels) == (12544, 47040000)
    assert (video.sampler, video.timestamp_style) == (sampler, style)
    assert (video.fps, video.max_duration) == (2, 300)


def test_missing_files_use_class_defaults(tmp_path: Path) -> None:
    assert load_processor_configs(tmp_path) == (ImageProcessorConfig(), VideoProcessorConfig())
    # Without a video file: video defaults plus the image file's processor class.
    write_json(tmp_path / "preprocessor_config.json", checkpoint_image_file("Glm46VProcessor"))
    image, video = load_processor_configs(tmp_path)
    assert image.max_pixels == 9633792
    assert video == VideoProcessorConfig(sampler="glm46v", timestamp_style="seconds")


def test_combined_processor_config_file(tmp_path: Path) -> None:
    write_json(
        tmp_path / "processor_config.json",
        {
            "processor_class": "Glm46VProcessor",
            "image_processor": checkpoint_image_file("Glm46VProcessor"),
            "video_processor": checkpoint_video_file("Glm46VVideoProcessor", "Glm46VProcessor"),
        },
    )
    image, video = load_processor_configs(tmp_path)
    assert image.max_pixels == 9633792
    assert (video.max_pixels, video.sampler, video.timestamp_style) == (
        47040000,
        "glm46v",
        "seconds",
    )


def test_corrupt_files_raise_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "preprocessor_config.json"
    path.write_text('{"size": {"shortest_edge": 12544,')
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json"):
        load_processor_configs(tmp_path)
    write_json(path, [1, 2, 3])
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json.*JSON object"):
        load_processor_configs(tmp_path)
    write_json(path, {})
    video_path = write_json(tmp_path / "video_preprocessor_config.json", {"fps": -1})
    with pytest.raises(ConfigError, match="fps"):
        load_processor_configs(tmp_path)
    video_path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"video_preprocessor_config\.json"):
        load_processor_configs(tmp_path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"size": {"longest_edge": 100000}}, "shortest_edge"),
        ({"size": {"shortest_edge": 10000, "longest_edge": 100}}, "larger than max_pixels"),
        ({"patch_size": 0}, "patch_size"),
        ({"merge_size": 1.5}, "merge_size"),
        ({"temporal_patch_size": True}, "temporal_patch_size"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
        ({"image_std": "wide"}, "image_std"),
        ({"rescale_factor": 0}, "rescale_factor"),
        ({"do_normalize": False}, "do_normalize"),
        ({"resample": 2}, "resample"),
        ({"processor_class": "LlavaProcessor"}, "processor_class"),
        ({"video_processor_type": "Qwen2VLVideoProcessor"}, "video_processor_type"),
        ({"max_duration": 0}, "max_duration"),
    ],
)
def test_bad_values_raise_config_error(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        VideoProcessorConfig.from_dict(data, source="video_preprocessor_config.json")


def test_configs_are_frozen_and_validated_on_construction() -> None:
    config = ImageProcessorConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.patch_size = 16  # type: ignore[misc]
    with pytest.raises(ConfigError, match="sampler"):
        VideoProcessorConfig(sampler="qwen")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timestamp_style"):
        VideoProcessorConfig(timestamp_style="frames")  # type: ignore[arg-type]
    assert ImageProcessorConfig.from_dict({"image_mean": 0.5}).image_mean == (0.5, 0.5, 0.5)
