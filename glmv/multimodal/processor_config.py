"""Image and video processor settings of a GLM-V checkpoint, read from its JSON files.

The values and defaults mirror transformers 5.23 (`Glm4vImageProcessor`, `Glm4vVideoProcessor`,
`Glm46VVideoProcessor`): a setting missing from the file takes the transformers class default, so
a checkpoint processed here gives the same pixels as with `AutoProcessor.from_pretrained`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from glmv.config import read_json_object
from glmv.errors import ConfigError

# CLIP normalisation, transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL's enum value for BICUBIC; the only resampling filter GLM-V checkpoints use.
_BICUBIC = 3

Sampler = Literal["glm4v", "glm46v"]
TimestampStyle = Literal["integer", "seconds"]

# Class names in the files -> behaviour. `processor_class` decides the timestamp text (it is the
# class that builds the prompt); `video_processor_type` decides the frame sampler.
_VIDEO_PROCESSOR_SAMPLERS: dict[str, Sampler] = {
    "Glm4vVideoProcessor": "glm4v",
    "Glm46VVideoProcessor": "glm46v",
}
_SAMPLER_TIMESTAMP_STYLES: dict[Sampler, TimestampStyle] = {"glm4v": "integer", "glm46v": "seconds"}
_PROCESSOR_SAMPLERS: dict[str, Sampler] = {"Glm4vProcessor": "glm4v", "Glm46VProcessor": "glm46v"}
_PROCESSOR_TIMESTAMP_STYLES: dict[str, TimestampStyle] = {
    name: _SAMPLER_TIMESTAMP_STYLES[sampler] for name, sampler in _PROCESSOR_SAMPLERS.items()
}

# Plain PatchConfig fields stored under the same key in transformers' files.
_SCALAR_KEYS = (
    "patch_size",
    "temporal_patch_size",
    "merge_size",
    "rescale_factor",
    "do_convert_rgb",
)

IMAGE_CONFIG_FILE = "preprocessor_config.json"
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
# Newer checkpoints may bundle both processors in one file under these keys.
COMBINED_CONFIG_FILE = "processor_config.json"


@dataclass(frozen=True)
class PatchConfig:
    """Resize budget and patch geometry shared by the image and video processors.

    Invariants (checked in `__post_init__`): sizes are positive integers, `min_pixels <=
    max_pixels`, mean/std have one entry per RGB channel and std has no zero.
    """

    min_pixels: int = 112 * 112  # `size.shortest_edge`: smallest resized area (t_bar*h*w)
    max_pixels: int = 28 * 28 * 15000  # `size.longest_edge`: largest resized area (t_bar*h*w)
    patch_size: int = 14  # ViT patch side in pixels
    temporal_patch_size: int = 2  # frames per temporal patch (an image is duplicated to fill it)
    merge_size: int = 2  # patches merged per side into one LLM token
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255  # uint8 -> [0, 1] before normalisation
    do_convert_rgb: bool = True  # composite alpha on white and convert any PIL mode to RGB

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}.{key} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(
                f"{name}: min_pixels ({self.min_pixels}) is larger than max_pixels "
                f"({self.max_pixels})"
            )
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if len(value) != 3 or not all(_is_finite_number(v) for v in value):
                raise ConfigError(f"{name}.{key} must be 3 finite numbers, got {value!r}")
        if any(v == 0 for v in self.image_std):
            raise ConfigError(f"{name}.image_std must not contain 0, got {self.image_std!r}")
        if not _is_finite_number(self.rescale_factor) or self.rescale_factor <= 0:
            raise ConfigError(f"{name}.rescale_factor must be > 0, got {self.rescale_factor!r}")
        if not isinstance(self.do_convert_rgb, bool):
            raise ConfigError(
                f"{name}.do_convert_rgb must be a boolean, got {self.do_convert_rgb!r}"
            )

    @property
    def factor(self) -> int:
        """Side length in pixels of one LLM token (resized sides are multiples of it)."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class ImageProcessorConfig(PatchConfig):
    """Settings of `Glm4vImageProcessor` (= `Glm46VImageProcessor`) for single images."""

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], source: str = "image processor config"
    ) -> ImageProcessorConfig:
        """Build from a `preprocessor_config.json` dict; `source` names it in errors."""
        return cls(**_patch_fields(d, source))

    @classmethod
    def from_file(cls, path: str | Path) -> ImageProcessorConfig:
        """Read a `preprocessor_config.json` file."""
        return cls.from_dict(_read_json(Path(path)), source=str(path))


@dataclass(frozen=True)
class VideoProcessorConfig(PatchConfig):
    """Settings of `Glm4vVideoProcessor` / `Glm46VVideoProcessor` plus the prompt's timestamp text.

    `sampler` picks the frame sampler (fixed fps for GLM-4.1V/4.5V, dynamic fps for GLM-4.6V);
    `timestamp_style` picks how the processor writes a frame pair's time into the prompt.
    """

    max_pixels: int = 28 * 28 * 2 * 30000
    fps: float = 2  # frames per second the glm4v sampler takes (glm46v ignores it)
    max_duration: float = 300  # seconds the glm4v sampler spreads its frames over at most
    sampler: Sampler = "glm4v"
    timestamp_style: TimestampStyle = "integer"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("fps", "max_duration"):
            value = getattr(self, key)
            if not _is_finite_number(value) or value <= 0:
                raise ConfigError(f"VideoProcessorConfig.{key} must be > 0, got {value!r}")
        if self.sampler not in _SAMPLER_TIMESTAMP_STYLES:
            raise ConfigError(
                f"VideoProcessorConfig.sampler must be one of {sorted(_SAMPLER_TIMESTAMP_STYLES)}, "
                f"got {self.sampler!r}"
            )
        if self.timestamp_style not in _SAMPLER_TIMESTAMP_STYLES.values():
            raise ConfigError(
                "VideoProcessorConfig.timestamp_style must be 'integer' or 'seconds', "
                f"got {self.timestamp_style!r}"
            )

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], source: str = "video processor config"
    ) -> VideoProcessorConfig:
        """Build from a `video_preprocessor_config.json` dict; `source` names it in errors."""
        values = _patch_fields(d, source)
        for key in ("fps", "max_duration"):
            if d.get(key) is not None:
                values[key] = d[key]
        sampler, style = _sampler_and_style(d, source)
        return cls(**values, sampler=sampler, timestamp_style=style)

    @classmethod
    def from_file(cls, path: str | Path) -> VideoProcessorConfig:
        """Read a `video_preprocessor_config.json` file."""
        return cls.from_dict(_read_json(Path(path)), source=str(path))


def load_processor_configs(
    model_dir: str | Path,
) -> tuple[ImageProcessorConfig, VideoProcessorConfig]:
    """Read a checkpoint folder's image and video processor settings.

    A missing `preprocessor_config.json` means transformers' class defaults; a missing
    `video_preprocessor_config.json` means the video class defaults with the image file's
    `processor_class` (which picks sampler and timestamp text). `processor_config.json`
    (`{"image_processor": ..., "video_processor": ...}`) is used when a separate file is absent.
    """
    model_dir = Path(model_dir)
    combined_path = model_dir / COMBINED_CONFIG_FILE
    combined = _read_json(combined_path) if combined_path.is_file() else {}

    image_path = model_dir / IMAGE_CONFIG_FILE
    image_dict: Mapping[str, Any]
    image_source = str(image_path)
    if image_path.is_file():
        image_dict = _read_json(image_path)
    else:
        image_dict = _sub_dict(combined, "image_processor", combined_path)
        image_source = f"{combined_path} (image_processor)"
    image_config = ImageProcessorConfig.from_dict(image_dict, source=image_source)

    processor_class = image_dict.get("processor_class") or combined.get("processor_class")
    video_path = model_dir / VIDEO_CONFIG_FILE
    if video_path.is_file():
        video_dict = dict(_read_json(video_path))
        video_source = str(video_path)
    else:
        video_dict = dict(_sub_dict(combined, "video_processor", combined_path))
        video_source = f"{combined_path} (video_processor)" if video_dict else "video defaults"
    if processor_class and "processor_class" not in video_dict:
        video_dict["processor_class"] = processor_class
    return image_config, VideoProcessorConfig.from_dict(video_dict, source=video_source)


def _patch_fields(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The PatchConfig fields present in a transformers processor dict (absent = class default)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    _reject_unsupported(d, source)
    values: dict[str, Any] = {}
    size = d.get("size")
    if size is not None:
        # transformers replaces the whole `size` dict, and GLM's resize needs both keys.
        if not isinstance(size, Mapping) or not {"shortest_edge", "longest_edge"} <= set(size):
            raise ConfigError(
                f"{source}: 'size' must have 'shortest_edge' and 'longest_edge' (pixel areas), "
                f"got {size!r}"
            )
        values["min_pixels"] = size["shortest_edge"]
        values["max_pixels"] = size["longest_edge"]
    for key in _SCALAR_KEYS:
        if d.get(key) is not None:
            values[key] = d[key]
    for key in ("image_mean", "image_std"):
        value = d.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3  # transformers broadcasts a scalar over the channels
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list of 3 numbers, got {value!r}")
        values[key] = tuple(value)
    return values


def _reject_unsupported(d: Mapping[str, Any], source: str) -> None:
    """Refuse settings that would make transformers take a path this processor does not have."""
    for key in ("do_resize", "do_rescale", "do_normalize"):
        if d.get(key) is False:
            raise ConfigError(f"{source}: '{key}: false' is not supported (GLM-V always uses it)")
    resample = d.get("resample")
    if resample is not None and resample != _BICUBIC:
        raise ConfigError(f"{source}: resample={resample!r} is not supported, only 3 (bicubic)")


def _sampler_and_style(d: Mapping[str, Any], source: str) -> tuple[Sampler, TimestampStyle]:
    video_type = d.get("video_processor_type")
    processor_class = d.get("processor_class")
    _check_known(video_type, _VIDEO_PROCESSOR_SAMPLERS, "video_processor_type", source)
    _check_known(processor_class, _PROCESSOR_TIMESTAMP_STYLES, "processor_class", source)
    sampler: Sampler = "glm4v"
    if video_type:
        sampler = _VIDEO_PROCESSOR_SAMPLERS[video_type]
    elif processor_class:
        # Without a video file the processor class implies its video processor class.
        sampler = _PROCESSOR_SAMPLERS[processor_class]
    style = (
        _PROCESSOR_TIMESTAMP_STYLES[processor_class]
        if processor_class
        else _SAMPLER_TIMESTAMP_STYLES[sampler]
    )
    return sampler, style


def _check_known(value: Any, table: Mapping[str, Any], key: str, source: str) -> None:
    if value is not None and value not in table:
        raise ConfigError(f"{source}: unsupported {key} {value!r}; expected one of {sorted(table)}")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, ConfigError, "processor config")


def _sub_dict(d: Mapping[str, Any], key: str, path: Path) -> Mapping[str, Any]:
    value = d.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: '{key}' must be a JSON object")
    return value


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
