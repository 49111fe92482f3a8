"""Commands from the server (``report_now``, ``set_log_level``, ``send_logs``, ``rollback``, ``restart_agent``,
``rotate_credentials``) and their acknowledgements.

Every command is answered ``accepted`` when it is taken, then ``done`` or ``failed``; ``rejected`` when it
expired on the way, is not supported, or asks for what this device cannot do. A command seen before (the
broker redelivers) is answered ``done`` without being carried out again. Answers given while off the broker
are sent on reconnecting (:meth:`Commands.flush`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from agent.config import AgentConfig
from agent.errors import AgentError
from agent.installer import Installer
from agent.logring import LogRing
from agent.selfupdate import RESTART_EXIT
from agent.smoke import smoke_test
from protocol import AckStatus, Command, CommandAck, CommandKind, ProtocolError, TopicKind, device_topic, encode

if TYPE_CHECKING:
    from agent.session import Session

__all__ = ["LOG_LEVELS", "RESTART_EXIT_STATUS", "Commands"]

log = logging.getLogger(__name__)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: How ``edgeherd-agent run`` exits after a ``restart_agent`` command (EX_TEMPFAIL, as after a self-update):
#: non-zero, so a service manager with ``Restart=on-failure`` starts it again, and distinct from a crash (1) or
#: a bad config (2).
RESTART_EXIT_STATUS = RESTART_EXIT
#: An outcome: the final answer to a command and its message.
Outcome = tuple[AckStatus, str]


class Commands:
    """Carries out commands on the worker thread. ``close_window`` closes the statistics window now;
    ``publish_state`` republishes the device's state (after a rollback); ``ring`` holds the log lines
    ``send_logs`` sends; ``restart`` asks the process to stop and exit with :data:`RESTART_EXIT_STATUS` (without
    it, ``restart_agent`` is rejected)."""

    def __init__(self, cfg: AgentConfig, session: Session, installer: Installer, *,
                 close_window: Callable[[], None], publish_state: Callable[[], None], ring: LogRing | None = None,
                 restart: Callable[[], None] | None = None) -> None:
        self._ring = ring
        self._restart = restart
        self.cfg = cfg
        self.session = session
        self.installer = installer
        self._close_window = close_window
        self._publish_state = publish_state
        self._topic = device_topic(cfg.device_id, TopicKind.ACK)
        self._seen: deque[str] = deque(maxlen=256)
        #: Command answers given while off the broker (the newest 64), sent on reconnecting.
        self._unsent: deque[bytes] = deque(maxlen=64)

    def flush(self) -> None:
        """Send the answers to commands handled while the connection was down."""
        while self._unsent:
            if self.session.publish(self._topic, self._unsent[0]) is None:
                break
            self._unsent.popleft()

    def _ack(self, cmd: Command, status: AckStatus, message: str = "") -> None:
        reply = CommandAck(device_id=self.cfg.device_id, command_id=cmd.command_id, status=status,
                           message=message[:1000], ts=datetime.now(timezone.utc))
        payload = encode(reply)
        if self.session.publish(self._topic, payload) is None:  # off the broker: sent when it is back
            self._unsent.append(payload)

    def handle(self, cmd: Command) -> None:
        if cmd.command_id in self._seen:
            self._ack(cmd, AckStatus.DONE, "already carried out")
            return
        self._seen.append(cmd.command_id)
        if cmd.expires_at is not None and cmd.expires_at < datetime.now(timezone.utc):
            self._ack(cmd, AckStatus.REJECTED, "the command expired before it arrived")
            return
        self._ack(cmd, AckStatus.ACCEPTED)
        self._ack(cmd, *self._carry_out(cmd))
        if cmd.kind is CommandKind.RESTART_AGENT and self._restart is not None:
            self._restart()  # after the answer, which leaves before the offline state the stop sends

    def _carry_out(self, cmd: Command) -> Outcome:
        match cmd.kind:
            case CommandKind.REPORT_NOW:
                self._close_window()
                return AckStatus.DONE, "window closed and queued"
            case CommandKind.SET_LOG_LEVEL:
                level = str(cmd.args.get("level", "")).upper()
                if level not in LOG_LEVELS:
                    return AckStatus.FAILED, "args.level must be DEBUG, INFO, WARNING or ERROR"
                logging.getLogger("agent").setLevel(level)
                log.warning("log level set to %s by the server", level)
                return AckStatus.DONE, f"log level is {level}"
            case CommandKind.ROLLBACK:
                return self.rollback()
            case CommandKind.SEND_LOGS if self._ring is not None:
                return self.send_logs(cmd, self._ring)
            case CommandKind.RESTART_AGENT if self._restart is not None:
                log.warning("restarting on the server's command (exit status %d)", RESTART_EXIT_STATUS)
                return AckStatus.DONE, f"stopping; exiting with status {RESTART_EXIT_STATUS} to be started again"
            case CommandKind.ROTATE_CREDENTIALS if "certificate" in cmd.args:
                return self.rotate_certificate(str(cmd.args["certificate"]), str(cmd.args["key"]),
                                                str(cmd.args["ca"]))
            case CommandKind.ROTATE_CREDENTIALS:
                return self.rotate_credentials(str(cmd.args["password"]))
        return AckStatus.REJECTED, f"{cmd.kind.value} is not supported by this agent"

    def send_logs(self, cmd: Command, ring: LogRing) -> Outcome:
        """Publish the newest log lines asked for (``args.lines``, after ``args.since``) as one LogBatch."""
        lines, since = int(cmd.args.get("lines", 0)), int(cmd.args.get("since", 0))
        batch = ring.batch(self.cfg.device_id, cmd.command_id, lines, since)
        if self.session.publish(device_topic(self.cfg.device_id, TopicKind.LOGS), encode(batch)) is None:
            return AckStatus.FAILED, "not connected to the broker; ask again"
        cut = ", cut to fit 64 KiB" if batch.truncated else ""
        return AckStatus.DONE, f"sent {len(batch.lines)} lines up to {batch.next_seq}{cut}"

    def rotate_credentials(self, password: str) -> Outcome:
        """Store the next broker password for the next connection (agent/credentials.py); expect the broker to end
        this one once it takes the new password (Mosquitto does), and then reconnect at once."""
        creds = self.session.credentials
        if not creds.rotatable:
            return AckStatus.FAILED, ("the broker password is set inline (password or EDGEHERD_AGENT_PASSWORD); "
                                      "rotation needs it in password_file")
        try:
            creds.rotate(password)
        except (OSError, AgentError) as exc:
            return AckStatus.FAILED, f"could not store the new password: {exc}"
        self.session.reconnect_at_once()
        return AckStatus.DONE, f"new password stored in {creds.file}; used from the next connection"

    def rotate_certificate(self, certificate: str, key: str, ca: str) -> Outcome:
        """Check and store the next certificate, key and CA bundle for the next connection (agent/credentials.py);
        expect the server to end this connection once it has revoked the old certificate, and then reconnect at
        once."""
        certs = self.session.certificates
        if not certs.rotatable:
            return AckStatus.REJECTED, ("this agent logs in without a certificate of its own (tls_cert and tls_key "
                                        "in its config, with an mqtts:// broker_url), so it cannot take a new one")
        material = certificate.encode(), key.encode(), ca.encode()
        from agent.credentials import check_certificate  # cryptography.x509, loaded when a certificate comes

        problem = check_certificate(*material, self.cfg.device_id)
        if problem is not None:
            log.warning("refused a new certificate from the server: %s", problem)
            return AckStatus.REJECTED, problem
        try:
            certs.rotate(*material)
        except (OSError, AgentError) as exc:
            return AckStatus.FAILED, f"could not store the new certificate: {exc}"
        self.session.reconnect_at_once()
        return AckStatus.DONE, f"new certificate stored in {self.cfg.tls_cert}; used from the next connection"

    def rollback(self) -> Outcome:
        """Serve the model in the other slot again, once it loads and passes its smoke test."""
        installer = self.installer
        active = installer.slots.active()
        other = "b" if active == "a" else "a"
        contents = installer.slots.read(other)
        if contents is None:
            return AckStatus.FAILED, f"slot {other} holds no model to roll back to"
        try:
            cand = installer.load(contents)
            problem = smoke_test(cand)
        except (AgentError, ProtocolError, KeyError) as exc:
            return AckStatus.FAILED, f"slot {other} does not load: {exc}"
        if problem:
            cand.close()
            return AckStatus.FAILED, problem
        installer.promote(other, cand)
        self._publish_state()
        return AckStatus.DONE, f"rolled back to {contents.manifest.model} {contents.manifest.version} in slot {other}"
