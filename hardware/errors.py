"""The root of what :mod:`hardware` raises, so a caller catches one thing::

    HardwareError
    ├── ProfileError (hardware/profiles)
    │   └── UnknownProfile
    ├── ProvisionError (hardware/provision.py)
    ├── WheelhouseError (hardware/wheelhouse.py)
    └── MosquittoConfigError (hardware/mosquitto.py; also a ValueError)
"""

from __future__ import annotations

__all__ = ["HardwareError", "MosquittoConfigError"]


class HardwareError(Exception):
    """A hardware profile, provisioning bundle, wheelhouse or broker file cannot be made; the message says why."""


class MosquittoConfigError(HardwareError, ValueError):
    """A value that cannot go into a Mosquitto password, ACL or configuration file."""
