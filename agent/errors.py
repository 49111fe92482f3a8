"""Exceptions raised by :mod:`agent`.

::

    AgentError
    ├── BackendError          an inference runtime problem
    │   ├── RuntimeMissing    the runtime an artifact needs is not installed
    │   ├── ModelLoadError    the runtime could not load the artifact
    │   └── InputError        a prediction input has the wrong shape or dtype
    └── ConfigError           the agent's configuration is invalid
"""

from __future__ import annotations

__all__ = ["AgentError", "BackendError", "ConfigError", "InputError", "ModelLoadError", "RuntimeMissing"]


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


class ConfigError(AgentError):
    pass
