"""Summary features of image inputs, computed identically at build time and on devices.

Drift on images is measured on cheap per-image summaries rather than on raw
pixels. The toolchain computes the reference profile with this function and
the agent computes each window's statistics with it, so the two cannot
disagree. Images larger than 64 pixels on a side are first subsampled with a
stride of ``ceil(max(height, width) / 64)``, which keeps the cost per image
bounded whatever the resolution. The set is versioned: ``image-summaries/1``
is, per channel ``c``:

- ``c{c}_mean``, ``c{c}_std``: brightness and contrast;
- ``c{c}_min``, ``c{c}_max``: range (a saturated or dead sensor shows here);
- ``c{c}_grad``: mean absolute difference between neighbouring pixels, a
  sharpness measure (blur lowers it, noise raises it).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["IMAGE_SUMMARIES", "image_summaries", "image_summary_names", "summary_stride", "summary_view"]

IMAGE_SUMMARIES: Literal["image-summaries/1"] = "image-summaries/1"
_PER_CHANNEL = ("mean", "std", "min", "max", "grad")
_MAX_SIDE = 64


def image_summary_names(channels: int) -> list[str]:
    return [f"c{c}_{what}" for c in range(channels) for what in _PER_CHANNEL]


def summary_stride(height: int, width: int) -> int:
    """The stride at which the summaries read an image of this size: ``ceil(max(height, width) / 64)``."""
    return -(-max(height, width) // _MAX_SIDE)


def summary_view(x: np.ndarray) -> np.ndarray:
    """The pixels the summaries read: every ``stride``-th row and column, at most 64 × 64 per channel (a view,
    no copy). The work per image is bounded by this, not by the capture size."""
    stride = summary_stride(x.shape[2], x.shape[3])
    return x[:, :, ::stride, ::stride] if stride > 1 else x


def image_summaries(x: np.ndarray) -> np.ndarray:
    """Summaries of a batch of images shaped (n, channels, height, width): (n, 5 × channels) float64."""
    if x.ndim != 4:
        raise ValueError(f"image summaries need (n, channels, height, width), got shape {x.shape}")
    # work in the input's own precision (no float64 copy of the batch); accumulate in float64
    x = summary_view(x if x.dtype in (np.float32, np.float64) else x.astype(np.float32))
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    grad = np.zeros((n, c))
    if x.shape[3] > 1:
        grad += np.abs(np.diff(x, axis=3)).mean(axis=(2, 3), dtype=np.float64)
    if x.shape[2] > 1:
        grad += np.abs(np.diff(x, axis=2)).mean(axis=(2, 3), dtype=np.float64)
    cols = np.stack([flat.mean(axis=2, dtype=np.float64), flat.std(axis=2, dtype=np.float64),
                     flat.min(axis=2).astype(np.float64), flat.max(axis=2).astype(np.float64), grad], axis=2)
    return cols.reshape(n, c * len(_PER_CHANNEL))
