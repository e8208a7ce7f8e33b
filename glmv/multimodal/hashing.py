"""Content hashes of preprocessed media, for the prefix and vision-encoder caches.

The hash covers the pixel values fed to the vision tower and their grid, so the same picture
under the same processor settings always hashes the same, whatever file or URL it came from.
The image and video processors hash what fixes those values instead, a quarter of the bytes:
the uint8 patches and the normalisation's constants (image.patchify_normalized).
"""

from __future__ import annotations

import hashlib

import torch


def hash_pixels(pixel_values: torch.Tensor, grid_thw: tuple[int, int, int],
                extra: str = "") -> str:
    """Hex digest of a preprocessed image/video (SHA-256 cut to 128 bits: with the CPU's SHA
    instructions about twice BLAKE2b's speed, ~3 ms for an image's 4.8 MB of pixels)."""
    h = hashlib.sha256()
    h.update(f"{tuple(grid_thw)}|{tuple(pixel_values.shape)}|{extra}|".encode())
    # The array's buffer is hashed in place (no copy of a possibly large video).
    h.update(pixel_values.detach().contiguous().cpu().numpy().data)
    return h.hexdigest()[:32]
