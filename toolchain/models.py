"""Model definitions: the built-in recipes, preprocessing baked into the graph, user models.

:func:`mobilenet_v3_small` is MobileNetV3-Small written from the paper (Howard et al., "Searching for
MobileNetV3", 2019, table 2; same layers and parameter count as torchvision's), so that an image model trains and
exports without torchvision: torchvision's wheels must match the installed torch build exactly, and PyPI's do not
import beside a CPU-only torch ("operator torchvision::nms does not exist"). A user's network comes in as
``module:callable`` (a class or a factory function) with keyword arguments (:func:`construct_model`), so
``torchvision.models:mobilenet_v3_small`` with ``num_classes`` is called the same way wherever torchvision
imports; torchvision and timm names have not been run by edgeherd's own tests for that reason.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolchain.errors import ModelError

__all__ = ["DigitsCNN", "MobileNetV3", "Normalized", "TabularMLP", "accepts", "construct_model", "load_user_model",
           "load_weights", "mobilenet_v3_small", "parse_model_args"]


class Normalized(nn.Module):
    """``core((x - mean) / std)``: the normalisation travels inside the exported graph."""

    def __init__(self, core: nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float32)))

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.core((x - self.mean) / self.std)
        return out


class DigitsCNN(nn.Module):
    """A small CNN for 1×8×8 images: about 72k parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


class TabularMLP(nn.Module):
    def __init__(self, features: int, classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def _divisible(value: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of ``divisor``, never more than 10% below ``value`` (the paper's rule)."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


class _SqueezeExcite(nn.Module):
    """Channel attention: global average, a bottleneck to a quarter of the channels, a hard-sigmoid gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = _divisible(channels / 4)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        s = nn.functional.hardsigmoid(self.expand(nn.functional.relu(self.reduce(s))))
        return x * s


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int, act: type[nn.Module] | None
             ) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    """1×1 expansion, depthwise k×k (with the stride), optional squeeze-excite, 1×1 linear projection; a residual
    connection when the shape is kept."""

    def __init__(self, cin: int, expand: int, cout: int, kernel: int, se: bool, act: type[nn.Module],
                 stride: int) -> None:
        super().__init__()
        self.residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != cin:
            layers.append(_conv_bn(cin, expand, 1, 1, 1, act))
        layers.append(_conv_bn(expand, expand, kernel, stride, expand, act))
        if se:
            layers.append(_SqueezeExcite(expand))
        layers.append(_conv_bn(expand, cout, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x)
        return x + out if self.residual else out


#: MobileNetV3-Small, table 2 of the paper: kernel, expansion, output channels, squeeze-excite, hard-swish, stride.
_SMALL = [
    (3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1),
]


class MobileNetV3(nn.Module):
    """MobileNetV3-Small for RGB images of any size of at least 32×32 (global pooling before the head).

    ``width_mult`` scales every layer's channels (0.5 keeps a quarter of the multiply-adds); the head is a
    1024-wide hard-swish layer with dropout, as in the paper. ``bn_momentum`` is how fast batch norm's running
    statistics follow the training batches (see :func:`mobilenet_v3_small`).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                 in_channels: int = 3, bn_momentum: float = 0.1) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 0.1 <= width_mult <= 4.0:
            raise ValueError(f"width_mult must be between 0.1 and 4, got {width_mult}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum}")
        stem = _divisible(16 * width_mult)
        layers: list[nn.Module] = [_conv_bn(in_channels, stem, 3, 2, 1, nn.Hardswish)]
        cin = stem
        for kernel, expand, cout, se, hswish, stride in _SMALL:
            cout_w = _divisible(cout * width_mult)
            layers.append(_InvertedResidual(cin, _divisible(expand * width_mult), cout_w, kernel, se,
                                            nn.Hardswish if hswish else nn.ReLU, stride))
            cin = cout_w
        last = _divisible(576 * width_mult)
        layers.append(_conv_bn(cin, last, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        hidden = _divisible(1024 * width_mult)
        self.classifier = nn.Sequential(nn.Linear(last, hidden), nn.Hardswish(), nn.Dropout(dropout),
                                        nn.Linear(hidden, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).mean(dim=(2, 3))
        out: torch.Tensor = self.classifier(pooled)
        return out


def mobilenet_v3_small(num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                       bn_momentum: float = 0.5) -> MobileNetV3:
    """MobileNetV3-Small, with torchvision's keyword arguments (``num_classes``, ``width_mult``, ``dropout``).

    Trained from scratch on a few hundred images, a build takes a few dozen optimiser steps: with torch's
    default batch-norm momentum (0.1) the running statistics still lag the weights at the end and the exported
    (eval-mode) network answers one class for everything. 0.5 lets them follow within a few steps; give
    ``bn_momentum=0.1`` for long runs on large folders.
    """
    return MobileNetV3(num_classes=num_classes, width_mult=width_mult, dropout=dropout, bn_momentum=bn_momentum)


_BOOL = {"true": True, "false": False}
_INT = re.compile(r"^[+-]?\d+$")


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["num_classes=4", "width_mult=0.5"]`` → keyword arguments: each value an int, float, bool
    (true/false) or, failing those, the string as written."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelError(f"--model-arg {item!r}: write KEY=VALUE with KEY a Python identifier, e.g. "
                             "num_classes=4")
        if key in out:
            raise ModelError(f"--model-arg {key} is given twice")
        value: Any = text
        if text.lower() in _BOOL:
            value = _BOOL[text.lower()]
        elif _INT.match(text):
            value = int(text)
        else:
            try:
                value = float(text)
            except ValueError:
                value = text
        out[key] = value
    return out


def _import_callable(ref: str) -> Any:
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise ModelError(f"model must be given as module:Class or module:function (e.g. "
                         f"toolchain.models:mobilenet_v3_small), got {ref!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything at import time
        raise ModelError(f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj) or (isinstance(obj, type) and not issubclass(obj, nn.Module)):
        raise ModelError(f"{module_name} has no torch.nn.Module class or model-making function named {attr!r}")
    return obj


def accepts(ref: str, keyword: str) -> bool:
    """Whether the callable ``ref`` names takes the keyword argument ``keyword`` (or any, through ``**kwargs``)."""
    try:
        params = inspect.signature(_import_callable(ref)).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def construct_model(ref: str, args: dict[str, Any] | None = None) -> nn.Module:
    """Call ``module:callable`` (an ``nn.Module`` class or a function returning one) with ``args``."""
    obj = _import_callable(ref)
    args = args or {}
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
    try:
        model = obj(**args)
    except Exception as exc:  # the user's constructor may raise anything
        hint = "" if args else " (no --model-arg was given: pass what it needs as --model-arg KEY=VALUE)"
        raise ModelError(f"{ref}({shown}) failed: {type(exc).__name__}: {exc}{hint}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{ref}({shown}) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, ref: str, weights: Path) -> None:
    """Load the state_dict file ``weights`` into ``model`` (made from ``ref``), strictly."""
    if not weights.is_file():
        raise ModelError(f"weights file {weights} does not exist")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{weights} is not a loadable state_dict: {exc}") from None
    if not isinstance(state, dict):
        raise ModelError(f"{weights} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{weights} does not fit {ref}: {str(exc).splitlines()[0]}") from None


def load_user_model(ref: str, weights: Path, args: dict[str, Any] | None = None) -> nn.Module:
    """Make ``module:callable`` with ``args`` and load a state_dict into it."""
    model = construct_model(ref, args)
    load_weights(model, ref, weights)
    return model.eval()
