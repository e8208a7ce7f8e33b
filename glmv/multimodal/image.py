"""Image decoding and GLM-V image preprocessing, bit-identical to transformers 5.23.

The reference is `Glm4vImageProcessor` with its default torchvision backend:

    PIL image --convert_to_rgb--> uint8 [3, H, W] --smart_resize + bicubic (antialias)-->
    uint8 [3, h, w] --(x - 255*mean) / (255*std)--> float32 --patchify--> [gh*gw, 3*T*p*p]

The tensor steps (`resize_frames`, `patchify_normalized`) are shared with video.py.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

from glmv.errors import GlmvError, ImageError, MediaTooLargeError
from glmv.multimodal.hashing import hash_pixels
from glmv.multimodal.processor_config import ImageProcessorConfig, PatchConfig

ImageSource = bytes | bytearray | memoryview | str | os.PathLike[str] | PIL.Image.Image


def load_image(
    source: ImageSource, *, max_pixels: int | None = None, formats: tuple[str, ...] | None = None,
    check_size: Callable[[int, int], None] | None = None,
) -> PIL.Image.Image:
    """Decode an image (bytes, file path or PIL image), upright per its EXIF orientation.

    Like transformers' `load_image` it applies `ImageOps.exif_transpose`, but it keeps the mode
    (no `convert("RGB")`) so `to_rgb_array` can composite transparency the way the processor does
    for PIL inputs. The pixels are fully decoded here, so truncation surfaces as an ImageError.
    Multi-frame files (animated GIF/WEBP/PNG, multi-page TIFF) give their first frame.

    `max_pixels`: refuse (MediaTooLargeError) an image whose header declares more pixels, before
    any pixel is decoded; Pillow's own decompression-bomb error is refused the same way.
    `formats`: the Pillow plugins allowed to read the data (the sniffed format), None = any.
    `check_size(height, width)`: called with the size from the header, before decoding (and
    before the EXIF turn, so it must not care which side is which); it raises to refuse.
    """
    try:
        if isinstance(source, PIL.Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageError("image data is empty")
            image = PIL.Image.open(io.BytesIO(bytes(source)), formats=formats)
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"image file not found: {path}")
            image = PIL.Image.open(path, formats=formats)
        else:
            raise ImageError(f"unsupported image source type {type(source).__name__}")
        if max_pixels is not None:
            check_image_pixels(image.size, max_pixels)  # header only: nothing decoded yet
        if check_size is not None:
            width, height = image.size  # before the EXIF turn: the checks are symmetric
            check_size(height, width)
        upright = PIL.ImageOps.exif_transpose(image)
        upright.load()
    except GlmvError:
        raise
    except PIL.UnidentifiedImageError as e:
        if formats:  # the magic number said this format, its plugin could not read the header
            raise ImageError(
                f"cannot decode image: the data starts like a {'/'.join(formats)} image but its "
                "header is damaged or truncated"
            ) from e
        raise ImageError(
            "cannot decode image: the data is not an image in a format Pillow supports"
        ) from e
    except PIL.Image.DecompressionBombError as e:
        raise _bomb_error(e, max_pixels) from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # Pillow raises OSError("image file is truncated ...") and friends for damaged files.
        raise ImageError(f"cannot decode image: the data is truncated or corrupt ({e})") from e
    except Exception as e:
        # Malformed files can trip other exceptions deep inside Pillow's plugins.
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from e
    return upright


def _bomb_error(error: PIL.Image.DecompressionBombError,
                max_pixels: int | None) -> MediaTooLargeError:
    """Pillow refuses images over twice its MAX_IMAGE_PIXELS as soon as it reads the header,
    before `check_image_pixels` can; say it with the server's limit when that one is passed."""
    match = re.search(r"\((\d+) pixels\)", str(error))
    pixels = int(match.group(1)) if match else None
    if max_pixels is not None and pixels is not None and pixels > max_pixels:
        return MediaTooLargeError(f"image is {pixels:,} pixels, more than the limit of "
                                  f"{max_pixels:,} (--max-image-pixels)")
    return MediaTooLargeError(f"image is too large to decode safely: {error} (Pillow's own "
                              "limit, which --max-image-pixels cannot raise)")


def check_image_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """MediaTooLargeError if an image of `size` (width, height) has more than `max_pixels`."""
    width, height = size
    if width * height > max_pixels:
        raise MediaTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} (--max-image-pixels)"
        )


def to_rgb_array(image: PIL.Image.Image) -> np.ndarray:
    """RGB pixels [H, W, 3] uint8, exactly as transformers' `convert_to_rgb` makes them.

    An image with an alpha band or a `transparency` entry (palette or tRNS colour) is converted to
    RGBA and composited on opaque white; anything else goes through PIL's `convert("RGB")` (so
    CMYK uses PIL's naive formula and 16-bit grayscale "I;16" is clipped at 255, not scaled).
    Note that PIL lists "A" among the bands of LAB too, so LAB takes the alpha path as well.
    """
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = PIL.Image.alpha_composite(background, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert image mode {image.mode} to RGB: {e}") from e
    return np.array(rgb)  # [H, W, 3] uint8


def smart_resize(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = 2,
    factor: int = 28,
    min_pixels: int = 112 * 112,
    max_pixels: int = 14 * 14 * 2 * 2 * 2 * 6144,
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area budget counted over `num_frames`.

    Same arithmetic as transformers 5.x (tiny sides are first scaled up to `factor`).
    """
    if num_frames < temporal_factor:
        raise ImageError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height <= 0 or width <= 0:
        raise ImageError(f"image has an empty side: {height}x{width}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ImageError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(config: PatchConfig, num_frames: int, height: int, width: int) -> tuple[int, int]:
    """`smart_resize` with a processor config's factor and pixel budget."""
    return smart_resize(
        num_frames=num_frames,
        height=height,
        width=width,
        temporal_factor=config.temporal_patch_size,
        factor=config.factor,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
    )


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 [N, 3, H, W] to [N, 3, height, width].

    torchvision's `resize(..., BICUBIC, antialias=True)` runs uint8 natively through
    `interpolate` on CPU and returns the input untouched when the size does not change.
    Frames laid out channels last (as decoded: [N, H, W, 3] permuted, no copy) take ATen's
    vectorised uint8 path: the same bits as the [N, 3, H, W]-contiguous frames torchvision
    passes (checked on random sizes both ways), 2.5-2.7x faster, and no copy to make first;
    the result is channels last too.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ImageError(
            f"resize_frames expects uint8 [N, C, H, W], got {frames.dtype} {list(frames.shape)}"
        )
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return F.interpolate(
        frames,
        size=[height, width],
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )


def patchify_normalized(
    frames: torch.Tensor, config: PatchConfig, modality: str
) -> tuple[torch.Tensor, tuple[int, int, int], str]:
    """uint8 [T, 3, H, W] -> (float32 patches (`patchify`'s rows), each value (x - mean/r) /
    (std/r) of its channel: the fused form transformers uses; their grid; their content hash).

    The patches are cut from the uint8 frames and normalised after, a quarter of the bytes
    through the patch permutation and one float32 copy instead of two; the values are the
    same (the normalisation is elementwise). The hash is taken of the uint8 patches and the
    normalisation's constants, which fix the float pixels: a quarter of the bytes to hash."""
    # Scaling mean/std by 1/rescale_factor (instead of x by rescale_factor) reproduces
    # transformers' rounding bit for bit.
    mean = torch.tensor(config.image_mean) * (1.0 / config.rescale_factor)  # [3]
    std = torch.tensor(config.image_std) * (1.0 / config.rescale_factor)  # [3]
    patches, grid_thw = patchify(
        frames, config.patch_size, config.merge_size, config.temporal_patch_size
    )
    digest = hash_pixels(patches, grid_thw,
                         f"{modality}|{mean.tolist()}|{std.tolist()}|normalised after")
    # a new tensor (the in-place ops below leave frames be), rows contiguous
    out = patches.to(torch.float32, memory_format=torch.contiguous_format)
    channels = out.view(out.shape[0], mean.numel(), -1)  # columns: channel outermost
    channels.sub_(mean.view(1, -1, 1)).div_(std.view(1, -1, 1))
    return out, grid_thw, digest


def patchify(
    frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, C, H, W] -> ([gt*gh*gw, C*tps*p*p], (gt, gh, gw)); odd T repeats the last frame.

    Row order (temporal outermost, then 2x2 merge blocks, row-major inside a block):

        for t < gt, for bi < gh/m, for bj < gw/m, for mi < m, for mj < m:
            patch (row bi*m+mi, col bj*m+mj) of frames [t*tps, (t+1)*tps)
        columns: C outermost, then tps, then patch row, then patch column (the Conv3d input)
    """
    num_frames, channels, height, width = frames.shape
    if pad := -num_frames % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        num_frames += pad
    grid_t = num_frames // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = frames.reshape(
        grid_t,
        temporal_patch_size,
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    # -> [gt, gh/m, gw/m, m, m, C, tps, p, p]
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(
        grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size
    )
    return flat, (grid_t, grid_h, grid_w)


@dataclass
class ProcessedImage:
    """One image ready for the vision tower.

    `pixel_values` rows follow the block-major patch order of `patchify`; `grid_thw[0]` is always
    1 (the frame is duplicated to fill the temporal patch).
    """

    pixel_values: torch.Tensor  # [grid_h*grid_w, 3*temporal_patch_size*patch_size**2] float32
    grid_thw: tuple[int, int, int]  # (1, grid_h, grid_w) in patches
    original_size: tuple[int, int]  # (height, width) before resizing; grounding boxes use it
    resized_size: tuple[int, int]  # (height, width) fed to the vision tower
    merge_size: int = 2  # patches merged per side into one LLM token
    content_hash: str = ""  # of the pixels and grid (patchify_normalized); "": hash them

    @property
    def num_tokens(self) -> int:
        """Number of `<|image|>` placeholder tokens in the prompt."""
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size**2


#: Largest resized image of `"detail": "low"`, in pixels (height*width): at most 256 visual tokens
#: (448/28 = 16 tokens a side), like a thumbnail.
LOW_DETAIL_PIXELS = 448 * 448
IMAGE_DETAILS = ("low", "high", "auto")


def image_pixel_bounds(
    config: ImageProcessorConfig,
    detail: str | None = None,
    min_pixels: Any = None,
    max_pixels: Any = None,
) -> tuple[int, int] | None:
    """Per-image resize bounds (min, max pixels of the resized image) from a content part.

    None (the processor config's own bounds, unchanged) unless the part asks otherwise:
    `detail` "low" caps the image at LOW_DETAIL_PIXELS, "high" / "auto" keep the config;
    `min_pixels` / `max_pixels` (positive integers, min <= max, max at most the config's largest
    image) override either bound. ImageError for anything else. The config's `size` counts an
    image twice (it is one temporal patch of 2 frames); these numbers count it once.
    """
    if detail is not None and detail not in IMAGE_DETAILS:
        raise ImageError(f"image detail must be one of {', '.join(IMAGE_DETAILS)}, got {detail!r}")
    if detail != "low" and min_pixels is None and max_pixels is None:
        return None
    tps = config.temporal_patch_size
    largest = config.max_pixels // tps
    low, high = -(-config.min_pixels // tps), largest
    if detail == "low":
        high = min(LOW_DETAIL_PIXELS, largest)
        low = min(low, high)
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ImageError(f"image {name} must be a positive integer, got {value!r}")
        if value > largest:
            raise ImageError(
                f"image {name} {value:,} is above this model's largest image, {largest:,} pixels "
                f"(size.longest_edge {config.max_pixels:,} of the processor config, which counts "
                f"an image {tps} times)"
            )
    low = low if min_pixels is None else min_pixels
    high = high if max_pixels is None else max_pixels
    if low > high:
        raise ImageError(f"image min_pixels ({low:,}) is larger than max_pixels ({high:,})")
    return low, high


def _bounded(config: ImageProcessorConfig, bounds: tuple[int, int] | None) -> ImageProcessorConfig:
    if bounds is None:
        return config
    tps = config.temporal_patch_size
    return replace(config, min_pixels=bounds[0] * tps, max_pixels=bounds[1] * tps)


def process_image(
    image: PIL.Image.Image | np.ndarray,
    config: ImageProcessorConfig,
    pixel_bounds: tuple[int, int] | None = None,
) -> ProcessedImage:
    """Resize, normalise and patchify one image like `Glm4vImageProcessor` (torchvision).

    `pixel_bounds` (from `image_pixel_bounds`) replace the config's resize bounds for this image.
    """
    config = _bounded(config, pixel_bounds)
    frame = _to_chw_tensor(image, config.do_convert_rgb)  # [3, H, W] uint8
    height, width = int(frame.shape[-2]), int(frame.shape[-1])
    resized_h, resized_w = target_size(config, config.temporal_patch_size, height, width)
    resized = resize_frames(frame[None], resized_h, resized_w)  # [1, 3, h, w] uint8
    # An image is one temporal patch: the frame repeated temporal_patch_size times.
    frames = resized.expand(config.temporal_patch_size, -1, -1, -1)
    pixel_values, grid_thw, digest = patchify_normalized(frames, config, "image")
    return ProcessedImage(
        pixel_values=pixel_values,
        grid_thw=grid_thw,
        original_size=(height, width),
        resized_size=(resized_h, resized_w),
        merge_size=config.merge_size,
        content_hash=digest,
    )


def process_images(
    images: Sequence[PIL.Image.Image | np.ndarray], config: ImageProcessorConfig
) -> list[ProcessedImage]:
    """`process_image` for each image; concatenating their `pixel_values` gives transformers'."""
    return [process_image(image, config) for image in images]


def image_num_tokens(
    height: int,
    width: int,
    config: ImageProcessorConfig,
    pixel_bounds: tuple[int, int] | None = None,
) -> int:
    """Placeholder tokens for an image of this size, without touching pixels."""
    config = _bounded(config, pixel_bounds)
    resized_h, resized_w = target_size(config, config.temporal_patch_size, height, width)
    grid_h, grid_w = resized_h // config.patch_size, resized_w // config.patch_size
    return grid_h * grid_w // config.merge_size**2


def _to_chw_tensor(image: PIL.Image.Image | np.ndarray, do_convert_rgb: bool) -> torch.Tensor:
    """uint8 [3, H, W] as transformers' torchvision `process_image` produces it (its values;
    laid out channels last where the pixels came that way)."""
    if isinstance(image, PIL.Image.Image):
        array = to_rgb_array(image) if do_convert_rgb else np.array(image)
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ImageError(f"image mode {image.mode} is not 8-bit RGB and do_convert_rgb is off")
        return torch.from_numpy(array).permute(2, 0, 1)  # channels last (resize_frames)
    if isinstance(image, np.ndarray):
        return _array_to_chw(image, do_convert_rgb)
    raise ImageError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def _array_to_chw(array: np.ndarray, do_convert_rgb: bool) -> torch.Tensor:
    """A uint8 array [H, W], [H, W, C] or [C, H, W] (C in 1, 3, 4) -> uint8 [3, H, W]."""
    if array.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8, got {array.dtype}")
    if not array.flags.writeable:
        array = array.copy()  # e.g. np.asarray(PIL image); torch wants writable memory
    if array.ndim == 2:
        tensor = torch.from_numpy(np.ascontiguousarray(array))[None]
    elif array.ndim == 3:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        # transformers' rule: channels first wins when both ends could be channels.
        if array.shape[0] not in (1, 3, 4):
            if array.shape[-1] not in (1, 3, 4):
                raise ImageError(f"cannot tell the channel axis of image array {array.shape}")
            tensor = tensor.permute(2, 0, 1)
    else:
        raise ImageError(f"image arrays must be 2-D or 3-D, got shape {array.shape}")
    if do_convert_rgb:
        tensor = _composite_channels(tensor)
    if tensor.shape[0] != 3:
        raise ImageError(f"image has {tensor.shape[0]} channels; 3 (RGB) are needed")
    if tensor.permute(1, 2, 0).is_contiguous():
        return tensor  # channels last, as resize_frames takes it fastest
    return tensor.contiguous()


def _composite_channels(tensor: torch.Tensor) -> torch.Tensor:
    """Grayscale -> RGB and RGBA on white, as TorchvisionBackend.convert_to_rgb does for arrays."""
    if tensor.shape[0] == 1:
        return tensor.expand(3, -1, -1)
    if tensor.shape[0] != 4:
        return tensor
    hwc = tensor.movedim(0, -1).to(torch.float32).mul_(1.0 / 255)  # [H, W, 4] in [0, 1]
    rgb = hwc[..., :3] * hwc[..., 3:] + (1 - hwc[..., 3:])
    # torchvision's float -> uint8 scaling: multiply by 255.999 and truncate.
    return rgb.mul(255 + 1.0 - 1e-3).to(torch.uint8).movedim(-1, 0)
