"""Model definitions: the built-in recipes, preprocessing baked into the graph, user models."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolchain.errors import ModelError

__all__ = ["DigitsCNN", "Normalized", "TabularMLP", "load_user_model"]


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


def load_user_model(ref: str, weights: Path) -> nn.Module:
    """Instantiate ``module:Class`` (no constructor arguments) and load a state_dict into it."""
    module_name, sep, class_name = ref.partition(":")
    if not sep or not module_name or not class_name.isidentifier():
        raise ModelError(f"model must be given as module:Class (e.g. mypkg.nets:Classifier), got {ref!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything at import time
        raise ModelError(f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ModelError(f"{module_name} has no torch.nn.Module class named {class_name!r}")
    try:
        model = cls()
    except Exception as exc:
        raise ModelError(f"{ref}() failed: {type(exc).__name__}: {exc} (it must take no arguments)") from None
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
    return model.eval()
