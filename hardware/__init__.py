"""Hardware profiles, device detection, provisioning and broker credential files.

- :mod:`hardware.profiles`: one TOML file per supported device, validated (``load``, ``load_all``);
- :func:`detect` (:mod:`hardware.detection`): which profile this device (or an image) is, from its files;
- :mod:`hardware.provision` and :mod:`hardware.wheelhouse`: the offline installer bundles of ``edgeherd flash``;
- :mod:`hardware.mosquitto`: Mosquitto's password, ACL and config files; :mod:`hardware.files`: atomic writes.

The modules here that run on a device use the standard library, pydantic and
:mod:`protocol` only; :mod:`hardware.wheelhouse` runs on the operator's machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hardware.detection import Detection, detect

__all__ = ["Detection", "detect"]


def __getattr__(name: str) -> Any:  # detection loads the profiles: only when asked for
    if name in __all__:
        from hardware import detection

        return getattr(detection, name)
    raise AttributeError(f"module 'hardware' has no attribute {name!r}")
