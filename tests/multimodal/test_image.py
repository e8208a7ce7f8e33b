"""Image preprocessing parity with transformers' Glm4vImageProcessor (torchvision and PIL)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from glmv.errors import ImageError, MediaError
from glmv.multimodal.image import (
    ProcessedImage,
    image_num_tokens,
    load_image,
    process_image,
    process_images,
    resize_frames,
    smart_resize,
    to_rgb_array,
)
from glmv.multimodal.processor_config import ImageProcessorConfig
from tests.multimodal.conftest import CHECKPOINT_IMAGE_SIZE, PHOTO_NAMES, encode_image, png16

transformers = pytest.importorskip("transformers", reason="transformers is the reference")
from transformers import Glm4vImageProcessor, Glm4vImageProcessorPil  # noqa: E402
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.glm4v.image_processing_glm4v import (  # noqa: E402
    smart_resize as hf_smart_resize,
)

# The PIL backend resamples with PIL, whose uint8 bicubic rounds (and clamps overshoot) in a
# different pass order than torch's: almost all values agree to one uint8 step, a few pixels at
# sharp edges of an upscaled side differ by up to ~7 steps. Tolerances in uint8 steps, converted
# to normalised units with the smallest std.
ONE_STEP = 1 / 255 / 0.26130258  # ~0.015
PIL_BACKEND_MAX_STEPS = 8  # measured: 0.0995 (~6.8 steps) on the rocket photo
PIL_BACKEND_MIN_FRACTION_WITHIN_ONE_STEP = 0.999


@pytest.fixture(scope="module")
def hf_processor() -> Any:
    return Glm4vImageProcessor(size=dict(CHECKPOINT_IMAGE_SIZE))


@pytest.fixture(scope="module")
def hf_processor_pil() -> Any:
    return Glm4vImageProcessorPil(size=dict(CHECKPOINT_IMAGE_SIZE))


def hf_process(processor: Any, images: list[Any]) -> tuple[torch.Tensor, list[list[int]]]:
    out = processor(images=images, return_tensors="pt")
    return torch.as_tensor(out["pixel_values"]), out["image_grid_thw"].tolist()


def assert_same_as_hf(ours: ProcessedImage, processor: Any, image: Any) -> None:
    pixels, grids = hf_process(processor, [image])
    assert [list(ours.grid_thw)] == grids
    assert ours.pixel_values.dtype == torch.float32
    assert torch.equal(ours.pixel_values, pixels)


def photo_image(photos: dict[str, np.ndarray], name: str) -> PIL.Image.Image:
    return PIL.Image.fromarray(photos[name])


@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_photographs_match_torchvision_backend(
    photos: dict[str, np.ndarray], image_config: ImageProcessorConfig, hf_processor: Any, name: str
) -> None:
    image = photo_image(photos, name)
    ours = process_image(image, image_config)
    assert_same_as_hf(ours, hf_processor, image)
    assert ours.original_size == (image.height, image.width)
    assert ours.resized_size == (ours.grid_thw[1] * 14, ours.grid_thw[2] * 14)
    expected_tokens = hf_processor.get_number_of_image_patches(image.height, image.width) // 4
    assert ours.num_tokens == expected_tokens
    assert image_num_tokens(image.height, image.width, image_config) == expected_tokens


def test_several_images_in_one_call(
    photos: dict[str, np.ndarray], image_config: ImageProcessorConfig, hf_processor: Any
) -> None:
    images = [photo_image(photos, name) for name in ("astronaut", "chelsea", "camera", "coffee")]
    images.append(images[0])  # the same size twice: transformers batches those together
    ours = process_images(images, image_config)
    pixels, grids = hf_process(hf_processor, images)
    assert [list(item.grid_thw) for item in ours] == grids
    assert torch.equal(torch.cat([item.pixel_values for item in ours]), pixels)


def test_pil_backend_within_tolerance(
    photos: dict[str, np.ndarray], image_config: ImageProcessorConfig, hf_processor_pil: Any
) -> None:
    worst = 0.0
    for name in PHOTO_NAMES:
        image = photo_image(photos, name)
        ours = process_image(image, image_config)
        pixels, grids = hf_process(hf_processor_pil, [image])
        assert [list(ours.grid_thw)] == grids
        diff = (ours.pixel_values - pixels.to(torch.float32)).abs()
        worst = max(worst, float(diff.max()))
        within_one_step = float((diff <= ONE_STEP * 1.001).float().mean())
        assert within_one_step >= PIL_BACKEND_MIN_FRACTION_WITHIN_ONE_STEP, name
    print(f"max abs difference vs the PIL backend: {worst:.4f} ({worst / ONE_STEP:.1f} steps)")
    assert worst <= PIL_BACKEND_MAX_STEPS * ONE_STEP


@pytest.mark.parametrize(
    ("height", "width"), [(10, 10), (28, 28), (20, 600), (600, 20), (1, 1), (27, 29), (56, 56)]
)
def test_tiny_images_are_upscaled_like_transformers(
    image_config: ImageProcessorConfig, hf_processor: Any, height: int, width: int
) -> None:
    rng = np.random.default_rng(height * 1000 + width)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(array)
    ours = process_image(image, image_config)
    assert_same_as_hf(ours, hf_processor, image)
    assert ours.original_size == (height, width)


def test_protocol_examples() -> None:
    # (input, resized) pairs from the protocol's table, checkpoint sizes, num_frames 2.
    table = {
        (224, 224): (224, 224),
        (1080, 1920): (1092, 1932),
        (700, 1000): (700, 1008),
        (4000, 4000): (2184, 2184),
        (112, 112): (112, 112),
        (56, 56): (84, 84),
        (28, 28): (84, 84),
        (10, 10): (84, 84),
        (20, 600): (28, 840),
    }
    for (height, width), expected in table.items():
        got = smart_resize(2, height, width, 2, 28, 12544, 9633792)
        assert got == expected, (height, width)


def test_smart_resize_matches_transformers_on_a_grid() -> None:
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 5000, size=(300, 2))]
    sizes += [(h, w) for h in (1, 14, 27, 28, 29, 55, 56, 57) for w in (1, 28, 100, 3000)]
    for num_frames in (2, 3, 16, 640):
        for height, width in sizes:
            kwargs = {"min_pixels": 12544, "max_pixels": 47040000 if num_frames > 2 else 9633792}
            try:
                expected = hf_smart_resize(num_frames, height, width, **kwargs)
            except ValueError:
                with pytest.raises(ImageError):
                    smart_resize(num_frames, height, width, **kwargs)
                continue
            assert smart_resize(num_frames, height, width, **kwargs) == expected


def test_smart_resize_refuses_a_single_frame() -> None:
    with pytest.raises(ImageError, match="temporal_factor"):
        smart_resize(1, 100, 100)


def test_aspect_ratio_199_is_accepted(
    image_config: ImageProcessorConfig, hf_processor: Any
) -> None:
    image = PIL.Image.fromarray(np.full((28, 28 * 199, 3), 77, dtype=np.uint8))
    assert_same_as_hf(process_image(image, image_config), hf_processor, image)


def test_aspect_ratio_above_200_is_refused(
    image_config: ImageProcessorConfig, hf_processor: Any
) -> None:
    image = PIL.Image.fromarray(np.full((28, 28 * 201, 3), 77, dtype=np.uint8))
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_process(hf_processor, [image])
    with pytest.raises(ImageError, match=r"aspect ratio must be smaller than 200, got 201\.0"):
        process_image(image, image_config)
    with pytest.raises(ImageError, match="aspect ratio"):
        image_num_tokens(10, 2010, image_config)  # 10x2010 is scaled to 28x5628 first


# ----------------------------------------------------------------------------- PIL modes


def rgba_photo(photos: dict[str, np.ndarray]) -> PIL.Image.Image:
    """The astronaut with a real alpha channel: a horizontal ramp and a fully clear block."""
    rgb = photos["astronaut"][:256, :320]
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    alpha[:64, :64] = 0
    return PIL.Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


@pytest.fixture(scope="module")
def mode_files(photos: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Encoded files of every colour mode worth checking."""
    rgb = PIL.Image.fromarray(photos["chelsea"])
    rgba = rgba_photo(photos)
    palette = rgb.quantize(colors=64)
    palette_clear = palette.copy()
    palette_clear.info["transparency"] = int(np.asarray(palette)[0, 0])
    gray16 = (np.arange(40 * 50).reshape(40, 50) * 33).astype(np.uint16)  # 0 .. 65967 wraps
    rgb16 = (photos["coffee"][:60, :80].astype(np.uint16) * 257 + 3).astype(np.uint16)
    return {
        "L": encode_image(PIL.Image.fromarray(photos["camera"]), "PNG"),
        "RGBA": encode_image(rgba, "PNG"),
        "LA": encode_image(rgba.convert("LA"), "PNG"),
        "P": encode_image(palette, "PNG"),
        "P+transparency": encode_image(palette_clear, "PNG"),
        "P+transparency GIF": encode_image(palette_clear, "GIF"),
        "CMYK JPEG": encode_image(rgb.convert("CMYK"), "JPEG", quality=90),
        "I;16 PNG": png16(gray16),
        "I;16 PNG dark": png16((np.arange(30 * 40).reshape(30, 40) % 256).astype(np.uint16)),
        "RGB 16-bit PNG": png16(rgb16),
        "1": encode_image(rgb.convert("1"), "PNG"),
        "RGB tRNS": encode_image(
            rgb, "PNG", transparency=tuple(int(v) for v in photos["chelsea"][0, 0])
        ),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "L", "RGBA", "LA", "P", "P+transparency", "P+transparency GIF", "CMYK JPEG",
        "I;16 PNG", "I;16 PNG dark", "RGB 16-bit PNG", "1", "RGB tRNS",
    ],
)  # fmt: skip
def test_colour_modes_match_transformers(
    mode_files: dict[str, bytes],
    image_config: ImageProcessorConfig,
    hf_processor: Any,
    kind: str,
) -> None:
    data = mode_files[kind]
    ours_image = load_image(data)
    reference = PIL.Image.open(io.BytesIO(data))  # what a user hands transformers
    assert ours_image.mode == reference.mode
    expected_rgb = hf_convert_to_rgb(reference, return_numpy=True)
    assert np.array_equal(to_rgb_array(ours_image), expected_rgb)
    assert_same_as_hf(process_image(ours_image, image_config), hf_processor, reference)


def test_colour_mode_conversions_are_what_transformers_does(mode_files: dict[str, bytes]) -> None:
    images = {kind: load_image(data) for kind, data in mode_files.items()}
    # Transparency is composited on white: the clear block of the RGBA photo turns white.
    assert (to_rgb_array(images["RGBA"])[:64, :64] == 255).all()
    assert (to_rgb_array(images["LA"])[:64, :64] == 255).all()
    # A palette's transparent index becomes white too (the top-left pixel was chosen as it).
    assert (to_rgb_array(images["P+transparency"])[0, 0] == 255).all()
    # 16-bit grayscale opens as "I;16" and PIL clips it to 255 instead of scaling it down.
    assert images["I;16 PNG"].mode == "I;16"
    gray16 = to_rgb_array(images["I;16 PNG"])
    assert gray16[0, 0].tolist() == [0, 0, 0] and gray16[0, 8].tolist() == [255, 255, 255]
    # 16-bit RGB opens as 8-bit RGB (high byte).
    assert images["RGB 16-bit PNG"].mode == "RGB"
    # CMYK uses PIL's naive formula (no ICC profile).
    assert images["CMYK JPEG"].mode == "CMYK"


def test_numpy_inputs_match_transformers(
    photos: dict[str, np.ndarray], image_config: ImageProcessorConfig, hf_processor: Any
) -> None:
    rgba = np.array(rgba_photo(photos))
    arrays = {
        "HWC": photos["coffee"],
        "HW1": photos["camera"][..., None],
        "HWC4": rgba,
        "CHW": np.ascontiguousarray(photos["chelsea"].transpose(2, 0, 1)),
    }
    for name, array in arrays.items():
        ours = process_image(array, image_config)
        pixels, grids = hf_process(hf_processor, [array])
        assert [list(ours.grid_thw)] == grids, name
        assert torch.equal(ours.pixel_values, pixels), name
    with pytest.raises(ImageError, match="uint8"):
        process_image(photos["coffee"].astype(np.float32), image_config)


def test_patch_order_is_block_major() -> None:
    # 56x84 stays 56x84 (small min_pixels): 4x6 patches; patch (r, c) has grey level 10*r + c.
    array = np.zeros((56, 84, 3), dtype=np.uint8)
    for r in range(4):
        for c in range(6):
            array[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] = 10 * r + c
    config = ImageProcessorConfig(
        min_pixels=28 * 28, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0)
    )
    ours = process_image(array, config)
    assert ours.grid_thw == (1, 4, 6) and ours.pixel_values.shape == (24, 3 * 2 * 14 * 14)
    rows = (ours.pixel_values * 255).round().reshape(24, 3, 2, 14, 14)
    expected = []
    for block_row in range(2):
        for block_col in range(3):
            for r, c in ((0, 0), (0, 1), (1, 0), (1, 1)):
                expected.append(10 * (2 * block_row + r) + 2 * block_col + c)
    assert rows[:, 0, 0, 0, 0].tolist() == expected
    assert bool((rows == rows[:, :1, :1, :1, :1]).all())  # constant inside each patch


# ----------------------------------------------------------------------------- loading


def test_exif_orientation_is_applied(
    photos: dict[str, np.ndarray],
    image_config: ImageProcessorConfig,
    hf_processor: Any,
    tmp_path: Path,
) -> None:
    image = PIL.Image.fromarray(photos["chelsea"])  # 300x451, landscape
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    path.write_bytes(encode_image(image, "JPEG", exif=exif, quality=92))

    ours = process_image(load_image(path.read_bytes()), image_config)
    assert ours.original_size == (451, 300)  # upright: portrait
    assert_same_as_hf(ours, hf_processor, hf_load_image(str(path)))
    for source in (path, str(path), PIL.Image.open(path)):
        assert np.array_equal(
            to_rgb_array(load_image(source)), np.asarray(hf_load_image(str(path)))
        )


def test_truncated_image_raises_image_error(photos: dict[str, np.ndarray]) -> None:
    data = encode_image(PIL.Image.fromarray(photos["astronaut"]), "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])
    png = encode_image(PIL.Image.fromarray(photos["astronaut"]), "PNG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(png[: len(png) // 2])


def test_non_image_data_raises_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"%PDF-1.7 definitely not a picture")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    with pytest.raises(ImageError, match="not an image"):
        load_image(text_file)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="unsupported image source"):
        load_image(12345)  # type: ignore[arg-type]
    assert issubclass(ImageError, MediaError)


def test_resize_of_channels_last_frames_is_the_same_as_of_contiguous_ones() -> None:
    """resize_frames takes decoded frames channels last (ATen's vectorised uint8 path), where
    torchvision resizes [N, 3, H, W]-contiguous ones: the pixels must be the same, growing and
    shrinking, at sizes that do not divide."""
    g = torch.Generator().manual_seed(0)
    for (height, width), (new_h, new_w) in [((48, 64), (28, 56)), ((37, 91), (70, 14)),
                                            ((300, 200), (113, 421)), ((5, 7), (224, 224))]:
        frames = torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8, generator=g)
        channels_last = frames.permute(0, 3, 1, 2)
        ours = resize_frames(channels_last, new_h, new_w)
        assert ours.shape == (2, 3, new_h, new_w)
        assert torch.equal(ours, resize_frames(channels_last.contiguous(), new_h, new_w))
