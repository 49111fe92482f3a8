"""Device diagnostics: send a device a command and wait for its answer, and read its recent log lines.

Every command goes to the agent on its ``cmd`` topic and is answered on ``ack`` (:meth:`server.bus.Bus.request`);
``send_logs`` is also answered with a :class:`protocol.LogBatch` on the device's ``logs`` topic. Each command
sent leaves one ``device.command`` audit entry naming the operator, the device, the command and its outcome
(also when the device never answered). Following a log polls with ``since``, so only new lines come back.

Log lines come from the device and are untrusted: :func:`clean` makes their control characters visible
(``\\x1b``) instead of letting them reach an operator's terminal.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from sqlmodel import Session

from protocol import (
    MAX_LOG_LINES,
    AckStatus,
    Command,
    CommandAck,
    CommandKind,
    LogBatch,
    LogLine,
    TopicKind,
    device_topic,
)
from server.bus import ANSWER_S, BusError, answers
from server.db.models import Device
from server.registry import SYSTEM, RegistryError

if TYPE_CHECKING:
    from server.registry import Registry

__all__ = ["COMMANDS", "LOG_LEVELS", "MAX_LOG_LINES", "check_lines", "clean", "decode_lines", "fetch_logs",
           "follow_logs", "format_line", "send_command"]

log = logging.getLogger(__name__)

#: The commands an operator names (``edgeherd device cmd DEVICE NAME``), and what goes on the wire.
COMMANDS: dict[str, CommandKind] = {
    "report-now": CommandKind.REPORT_NOW,
    "set-log-level": CommandKind.SET_LOG_LEVEL,
    "restart": CommandKind.RESTART_AGENT,
    "rollback": CommandKind.ROLLBACK,
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: C0 controls but tab, DEL, C1 controls, and the bidirectional overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """``text`` with every control character written out as ``\\xNN`` (``\\uNNNN``), safe to print."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def format_line(line: LogLine) -> str:
    """One log line as a terminal shows it, cleaned."""
    ts = line.ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"{ts} {clean(line.level):<7} {clean(line.logger)}: {clean(line.text)}"


def decode_lines(items: object) -> list[LogLine]:
    """The ``lines`` of an API answer (``POST /devices/{id}/logs``) as LogLines; RegistryError when they are not."""
    if not isinstance(items, list) or len(items) > MAX_LOG_LINES:
        raise RegistryError("the server's answer holds no list of log lines; is it another edgeherd version?")
    try:
        return [LogLine.model_validate_json(json.dumps(item)) for item in items]
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"the server's answer holds a malformed log line: {exc}") from None


def _enrolled(reg: Registry, device_id: str) -> None:
    with Session(reg.engine) as db:
        device = db.get(Device, device_id)
        if device is None or device.revoked:
            raise RegistryError(f"no enrolled device named {device_id} (see `edgeherd device list`)")


def _command(kind: CommandKind, args: dict[str, bool | int | float | str], timeout: float) -> Command:
    now = datetime.now(timezone.utc)
    try:
        return Command(command_id=uuid.uuid4().hex, kind=kind, args=args, issued_at=now,
                       expires_at=now + timedelta(seconds=timeout))
    except ValueError as exc:  # pydantic's ValidationError: arguments the device would refuse
        raise RegistryError(f"{kind.value}: {exc}") from None


def _audit(reg: Registry, actor: str, device_id: str, cmd: Command, outcome: str, message: str) -> None:
    reg.record(actor, "device.command", f"device:{device_id}", {
        "command": cmd.kind.value, "command_id": cmd.command_id,
        "args": ",".join(f"{k}={v}" for k, v in sorted(cmd.args.items())), "outcome": outcome,
        "message": message[:200]})


def _silent(device_id: str, what: str, timeout: float) -> RegistryError:
    return RegistryError(f"{device_id} did not answer {what} within {timeout:g} s: is it online? (`edgeherd device "
                         "list` shows when it was last seen)")


def send_command(reg: Registry, device_id: str, name: str, level: str | None = None, *, actor: str = SYSTEM,
                 timeout: float = 30.0) -> CommandAck:
    """Send the command ``name`` (a key of :data:`COMMANDS`; ``level`` for ``set-log-level``) and wait up to
    ``timeout`` s for its final answer, which is returned (done, failed or rejected: the caller shows it).
    RegistryError for an unknown device or command, a bad level, an unreachable broker, or silence."""
    kind = COMMANDS.get(name)
    if kind is None:
        raise RegistryError(f"unknown command {name!r}: use one of {', '.join(COMMANDS)}")
    args: dict[str, bool | int | float | str] = {}
    if kind is CommandKind.SET_LOG_LEVEL:
        if level is None or level.upper() not in LOG_LEVELS:
            raise RegistryError(f"set-log-level needs a level: one of {', '.join(LOG_LEVELS)}")
        args["level"] = level.upper()
    elif level is not None:
        raise RegistryError(f"{name} takes no argument (only set-log-level takes a level)")
    _enrolled(reg, device_id)
    cmd = _command(kind, args, timeout)
    try:
        ack = reg._send_command(device_id, cmd, timeout)
    except RegistryError as exc:
        _audit(reg, actor, device_id, cmd, "error", str(exc))
        raise
    _audit(reg, actor, device_id, cmd, str(ack.status) if ack else "timeout", ack.message if ack else "")
    if ack is None:
        raise _silent(device_id, name, timeout)
    log.info("%s answered %s with %s: %s", device_id, name, ack.status, ack.message)
    return ack


def check_lines(lines: int) -> int:
    """``lines`` when it is a count a device sends; RegistryError saying the range otherwise."""
    if not 1 <= lines <= MAX_LOG_LINES:
        raise RegistryError(f"--lines must be from 1 to {MAX_LOG_LINES} (got {lines})")
    return lines


def fetch_logs(reg: Registry, device_id: str, lines: int = 100, since: int = 0, *, actor: str = SYSTEM,
               timeout: float = 30.0, audited: bool = True) -> LogBatch:
    """The device's newest ``lines`` log lines numbered above ``since`` (a ``send_logs`` command; audited unless
    ``audited`` is False, as the polls of a follow after its first are). RegistryError as for
    :func:`send_command`, and when the device answers without its lines."""
    check_lines(lines)
    _enrolled(reg, device_id)
    cmd = _command(CommandKind.SEND_LOGS, {"lines": lines, "since": since}, timeout)
    batches, on_logs = answers(LogBatch, device_id, cmd.command_id, "log lines")
    topic = device_topic(device_id, TopicKind.LOGS)
    outcome, message = "error", ""
    try:
        with reg.client() as bus:
            bus.route(topic, on_logs)
            if not bus.subscribe(topic, qos=1, wait=ANSWER_S):
                raise RegistryError(f"the broker did not grant the subscription to {device_id}'s logs")
            try:
                ack = bus.request(device_id, cmd, timeout)
            except BusError as exc:
                raise RegistryError(str(exc)) from None
            if ack is None:
                outcome = "timeout"
                raise _silent(device_id, "send_logs", timeout)
            outcome, message = str(ack.status), ack.message
            if ack.status is not AckStatus.DONE:
                raise RegistryError(f"{device_id} answered {ack.status}: {clean(ack.message) or 'no reason given'}")
            try:  # published before the answer, on the same connection: it is here or about to be
                return batches.get(timeout=ANSWER_S)
            except queue.Empty:
                outcome = "lost"
                raise RegistryError(f"{device_id} said it sent its log lines, but none arrived; ask again") from None
    except RegistryError as exc:
        message = message or str(exc)
        raise
    finally:
        if audited:
            _audit(reg, actor, device_id, cmd, outcome, message)


def follow_logs(reg: Registry, device_id: str, lines: int = 100, *, actor: str = SYSTEM, timeout: float = 30.0,
                interval: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> Iterator[LogBatch]:
    """The newest ``lines`` lines, then every ``interval`` s the lines logged since (only new ones), for as long
    as the caller reads; one audit entry for the whole follow."""
    batch = fetch_logs(reg, device_id, lines, actor=actor, timeout=timeout)
    yield batch
    while True:
        sleep(interval)
        batch = fetch_logs(reg, device_id, MAX_LOG_LINES, batch.next_seq, actor=actor, timeout=timeout,
                           audited=False)
        yield batch
