"""Exceptions raised by :mod:`toolchain`.

::

    ToolchainError
    ├── DataError            the dataset is missing, malformed or fails a fatal validation rule
    │   └── ValidationFailed    validation found fatal problems (toolchain/sources.py; carries the report)
    ├── ModelError           a user model (torch class, state dict, ONNX file) cannot be loaded
    │   └── QualityGateFailed   the trained model misses a quality gate (e.g. --min-slice-metric)
    ├── TrainingError        training cannot start or resume (e.g. a checkpoint from another run)
    ├── ConversionError      export, quantisation or compilation failed
    ├── BundleError          a bundle cannot be written, or fails verification
    └── SigningKeyError      the signing key is missing or unreadable
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ConversionError",
    "DataError",
    "ModelError",
    "QualityGateFailed",
    "SigningKeyError",
    "ToolchainError",
    "TrainingError",
]


class ToolchainError(Exception):
    """Base class of everything :mod:`toolchain` raises."""


class DataError(ToolchainError):
    pass


class ModelError(ToolchainError):
    pass


class QualityGateFailed(ModelError):
    """The model was built but misses a quality gate; nothing is written."""


class TrainingError(ToolchainError):
    pass


class ConversionError(ToolchainError):
    pass


class BundleError(ToolchainError):
    pass


class SigningKeyError(ToolchainError):
    pass
