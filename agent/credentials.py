"""The broker passwords the agent may log in with, and their rotation.

A rotation (``rotate_credentials``) writes the new password to
``password_file`` after adding the one it replaces to
``<password_file>.previous`` (newest first, at most :data:`KEEP_PREVIOUS`),
both atomically and mode 0600, and the agent acknowledges it; the server then
makes the broker take the new password instead of the old. The next
connection logs in with the new password. A broker that re-checks connected
clients when its password file changes (Mosquitto does, on reload) ends the
connection made with the old password at that moment; the agent, expecting
it, reconnects at once and resumes its MQTT session (agent/session.py), so
what was sent to it in between is delivered.

Should the acknowledgement never reach the server, the broker keeps the old
password. So the agent tries the current password first and the previous ones
after it, and forgets the previous ones only once the current one has been
accepted: a rotation that the server did not finish never locks a device out.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.config import AgentConfig
from agent.errors import ConfigError
from hardware.files import atomic_write

__all__ = ["KEEP_PREVIOUS", "Credentials"]

log = logging.getLogger(__name__)
#: Previous passwords kept until the current one is accepted (rotations in a row the server did not finish).
KEEP_PREVIOUS = 4


class Credentials:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.file = cfg.password_file

    @property
    def previous_file(self) -> Path | None:
        return None if self.file is None else self.file.with_name(self.file.name + ".previous")

    @property
    def rotatable(self) -> bool:
        """Whether a rotation can be stored: the password lives in a file."""
        return self.file is not None

    def _previous(self) -> list[str]:
        prev = self.previous_file
        if prev is None:
            return []
        try:
            lines = prev.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        return [line.strip() for line in lines if line.strip()]

    def candidates(self) -> list[str | None]:
        """Passwords to try, in order: the current one, then those rotations replaced (newest first)."""
        if self.file is None:
            return [self.cfg.password]
        out: list[str | None] = []
        try:
            out.append(self.cfg.broker_password())
        except ConfigError as exc:
            log.error("%s", exc)
        out += [p for p in self._previous() if p not in out]
        return out or [None]

    def rotate(self, new: str) -> None:
        """Store ``new`` as the password for the next connection, keeping the current one among the previous.

        Raises OSError when the files cannot be written; then the current password is unchanged.
        """
        if self.file is None or self.previous_file is None:
            raise ConfigError("the broker password is not in a file (password_file), so a new one cannot be stored")
        current = self.cfg.broker_password()
        if current == new:
            return
        keep = list(dict.fromkeys(p for p in [current, *self._previous()] if p and p != new))[:KEEP_PREVIOUS]
        if keep:
            atomic_write(self.previous_file, "".join(p + "\n" for p in keep), 0o600)
        atomic_write(self.file, new + "\n", 0o600)
        log.info("stored a new broker password in %s; it is used from the next connection", self.file)

    def accepted(self, index: int) -> None:
        """The broker accepted the ``index``-th of :meth:`candidates`."""
        prev = self.previous_file
        if prev is None or not prev.exists():
            return
        if index == 0:
            prev.unlink(missing_ok=True)
            log.info("the broker accepted the current password; forgot the previous ones")
        else:
            log.warning("the broker refused the current password in %s but took a previous one: the server did not "
                        "finish the last credential rotation. Keeping them all; rotate again from the server.",
                        self.file)
