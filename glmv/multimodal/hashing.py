"""Content hashes of preprocessed media, for the prefix and vision-encoder caches.

The hash covers the pixel values fed to the vision tower and their grid, so the same picture
under the same processor settings always hashes the same, whatever file or URL it came from.
"""

from __future__ import annotations

import hashlib

import torch


def hash_pixels(pixel_values: torch.Tensor, grid_thw: tuple[int, int, int],
                extra: str = "") -> str:
    """Hex digest of a preprocessed image/video (128-bit BLAKE2b)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(grid_thw)}|{tuple(pixel_values.shape)}|{extra}|".encode())
    # The array's buffer is hashed in place (no copy of a possibly large video).
    h.update(pixel_values.detach().contiguous().cpu().numpy().data)
    return h.hexdigest()
