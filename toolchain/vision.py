"""Image models that take raw pixels: the resize and the normalisation travel inside the exported graph.

A device sends what its camera gives, RGB 0–255 at the *capture size*
(the image folder's size, :mod:`toolchain.images`); :class:`ImageInput`
resizes that to the network's input resolution (bilinear, when the two
differ), scales it to 0–1 and normalises each channel with the training
split's mean and std, then runs the network. Nothing of this is left for the
device to get wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from protocol import Preprocessing
from toolchain.data import Dataset
from toolchain.errors import ModelError
from toolchain.images import check_size
from toolchain.models import accepts, construct_model, load_weights

__all__ = ["MIN_INPUT_SIDE", "ImageInput", "channel_stats", "image_model"]

#: Smallest side of the network's input resolution for an image-folder model.
MIN_INPUT_SIDE = 96


class ImageInput(nn.Module):
    """``core(normalise(resize(x) / 255))`` for raw RGB ``x`` shaped (n, 3, capture height, capture width)."""

    def __init__(self, core: nn.Module, capture: tuple[int, int], size: tuple[int, int], mean: np.ndarray,
                 std: np.ndarray) -> None:
        super().__init__()
        self.core = core
        self.capture, self.size = capture, size
        mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        # (x / 255 - mean) / std as one multiply-add per pixel
        scale = (1.0 / (255.0 * std32)).reshape(1, -1, 1, 1)
        self.register_buffer("scale", torch.as_tensor(scale))
        self.register_buffer("shift", torch.as_tensor((-mean32 / std32).reshape(1, -1, 1, 1)))

    scale: torch.Tensor
    shift: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size != self.capture:
            x = nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        out: torch.Tensor = self.core(x * self.scale + self.shift)
        return out


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of raw pixels (n, c, h, w) scaled to 0–1; a constant channel gets std 1."""
    scaled = x.astype(np.float64) / 255.0
    mean, std = scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3))
    return mean, np.where(std > 1e-6, std, 1.0)


def image_model(ref: str, args: dict[str, Any], weights: Any, ds: Dataset, train_x: np.ndarray,
                input_size: tuple[int, int] | None) -> tuple[nn.Module, Preprocessing]:
    """The network ``ref`` makes from ``args`` (``num_classes`` filled in from the dataset when the callable
    takes it and it was not given), wrapped in :class:`ImageInput`; with ``weights`` its state_dict is loaded
    first (training then starts from it)."""
    capture = (int(ds.input_shape[1]), int(ds.input_shape[2]))
    size = input_size or capture
    check_size(size, "--input-size")
    if min(size) < MIN_INPUT_SIDE:
        raise ModelError(f"the network's input resolution {size[0]}x{size[1]} is below {MIN_INPUT_SIDE}x"
                         f"{MIN_INPUT_SIDE}; give --input-size {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE} or more (the graph "
                         f"resizes the {capture[0]}x{capture[1]} capture to it)")
    args = dict(args)
    classes = len(ds.classes)
    if "num_classes" not in args and accepts(ref, "num_classes"):
        args["num_classes"] = classes
    core = construct_model(ref, args)
    if weights is not None:
        load_weights(core, ref, weights)
    core.eval()
    try:
        with torch.no_grad():
            probe = core(torch.zeros(1, 3, *size))
    except Exception as exc:  # the user's network may raise anything on a wrong shape
        raise ModelError(f"{ref} cannot run on a 1x3x{size[0]}x{size[1]} input: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300]}") from None
    if not isinstance(probe, torch.Tensor) or tuple(probe.shape) != (1, classes):
        got = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise ModelError(f"{ref} gives {got} for one image; the image folder has {classes} classes, so the build "
                         f"needs (1, {classes}): pass --model-arg num_classes={classes}")
    mean, std = channel_stats(train_x)
    model = ImageInput(core, capture, size, mean, std)
    resize = f"resized to {size[0]}x{size[1]}, " if size != capture else ""
    pre = Preprocessing(kind="normalize", mean=[float(v) for v in mean], std=[float(v) for v in std], in_graph=True,
                        description=f"raw RGB 0-255 at {capture[0]}x{capture[1]} in; {resize}scaled to 0-1, per-"
                        "channel mean and std of the training split")
    return model, pre
