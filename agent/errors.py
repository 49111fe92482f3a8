"""Exceptions raised by :mod:`agent`.

::

    AgentError
    ├── BackendError          an inference runtime problem
    │   ├── RuntimeMissing    the runtime an artifact needs is not installed
    │   ├── ModelLoadError    the runtime could not load the artifact
    │   ├── InputError        a prediction input has the wrong shape or dtype (HTTP 400)
    │   └── InferenceError    the runtime failed while running the model on an input (HTTP 500)
    ├── ConfigError           the agent's configuration is invalid
    ├── InstallFailure        a step of an install failed (the record says which); the old model keeps serving
    └── TransitionError       agent/install.py: a move the install state machine does not allow (a bug; also a
                              RuntimeError)
"""

from __future__ import annotations

__all__ = ["AgentError", "BackendError", "ConfigError", "InferenceError", "InputError", "InstallFailure",
           "ModelLoadError", "RuntimeMissing"]


class AgentError(Exception):
    """Base class of everything :mod:`agent` raises."""


class BackendError(AgentError):
    pass


class RuntimeMissing(BackendError):
    pass


class ModelLoadError(BackendError):
    pass


class InputError(BackendError):
    pass


class InferenceError(BackendError):
    """The loaded model failed at run time (an out-of-range index, a kernel error, a device fault).

    Counted as a failed request in the window statistics, so it shows in the device's error rate and in a
    rollout's error gate.
    """


class ConfigError(AgentError):
    pass


class InstallFailure(AgentError):
    """A step of an install failed; the message says why."""
