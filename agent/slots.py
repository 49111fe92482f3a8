"""A/B model slots on disk.

::

    <data_dir>/slots/a/model         the artifact
    <data_dir>/slots/a/bundle.json   its signed manifest, as received
    <data_dir>/slots/a/artifact      which artifact of the manifest it is
    <data_dir>/active                "a" or "b": the slot that serves

Installs go to the idle slot; switching rewrites ``active`` atomically, so a
power cut leaves either the old or the new slot active, never neither.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from hardware.files import atomic_copy, atomic_write
from protocol import Manifest, ProtocolError, SignedManifest, decode_model

__all__ = ["SlotContents", "Slots"]

SLOTS = ("a", "b")


@dataclass(frozen=True)
class SlotContents:
    slot: str
    model_path: Path
    signed: SignedManifest
    artifact: str

    @property
    def manifest(self) -> Manifest:
        return self.signed.manifest


class Slots:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "slots"
        for s in SLOTS:
            (self.root / s).mkdir(parents=True, exist_ok=True)
        self._active = data_dir / "active"

    def active(self) -> str | None:
        try:
            value = self._active.read_text().strip()
        except FileNotFoundError:
            return None
        return value if value in SLOTS else None

    def idle(self) -> str:
        return "b" if self.active() == "a" else "a"

    def read(self, slot: str) -> SlotContents | None:
        """What ``slot`` holds, or None when it holds nothing complete and parseable."""
        d = self.root / slot
        try:
            signed = decode_model(SignedManifest, (d / "bundle.json").read_bytes())
            artifact = (d / "artifact").read_text().strip()
        except (OSError, ProtocolError):
            return None
        if not (d / "model").is_file():
            return None
        return SlotContents(slot, d / "model", signed, artifact)

    def install(self, slot: str, model: Path, signed_bytes: bytes, artifact: str) -> SlotContents:
        d = self.root / slot
        for name in ("bundle.json", "artifact", "model"):  # invalidate first: a half-written slot reads as empty
            (d / name).unlink(missing_ok=True)
        atomic_copy(model, d / "model")
        atomic_write(d / "artifact", artifact.encode())
        atomic_write(d / "bundle.json", signed_bytes)  # last: its presence marks the slot complete
        contents = self.read(slot)
        if contents is None:
            raise OSError(f"slot {slot} did not read back after install")
        return contents

    def switch(self, slot: str) -> None:
        if slot not in SLOTS:
            raise ValueError(slot)
        atomic_write(self._active, slot.encode())

    def clear(self, slot: str) -> None:
        shutil.rmtree(self.root / slot, ignore_errors=True)
        (self.root / slot).mkdir(parents=True, exist_ok=True)
