"""``edgeherd device logs`` and ``edgeherd device cmd``: a device's recent log lines, and commands to its agent
(server/diagnostics.py). With a login they go through the operator API; on the server host, as ``--as``.

Log lines and answers come from the device: they are printed with their control characters escaped and without
rich markup, so a device cannot restyle or take over the operator's terminal.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from server.cli._common import Broker, DataDir, console, err, fail, open_registry, require_actor

__all__ = ["device_cmd", "device_logs"]

Timeout = Annotated[float, typer.Option("--timeout", min=1, max=300, help="Seconds to wait for the agent's answer.")]


def _print_lines(lines: list[Any], truncated: bool) -> None:
    from server.diagnostics import format_line

    for line in lines:
        console.print(format_line(line), markup=False, emoji=False)
    if truncated:
        err.print("(older lines did not fit in one 64 KiB answer; ask for fewer with --lines)")


def device_logs(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The device.")],
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many of the newest lines (1 to 2000).")] = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep asking for new lines until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.5, max=3600,
                                            help="Seconds between asks with --follow.")] = 2.0,
    timeout: Timeout = 30.0,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Show the agent's newest log lines (it keeps the last 2000 lines / 256 KiB in memory)."""
    from server.cli.remote import call, remote
    from server.diagnostics import check_lines, decode_lines, follow_logs
    from server.registry import RegistryError

    try:
        check_lines(lines)
    except RegistryError as exc:
        fail(exc)
    client = remote(ctx)
    try:
        if client is not None:
            client.timeout = max(client.timeout, timeout + 30)
            since, ask = 0, lines
            while True:
                got = call(client, "POST", f"/devices/{name}/logs", {"lines": ask, "since": since,
                                                                     "timeout": timeout})
                _print_lines(decode_lines(got.get("lines")), bool(got.get("truncated")))
                if not follow:
                    return
                since, ask = int(got["next_seq"]), 2000
                time.sleep(interval)
        actor = require_actor(ctx, data_dir, "COMMAND_DEVICE")
        for batch in follow_logs(open_registry(data_dir, broker), name, lines, actor=actor, timeout=timeout,
                                 interval=interval):
            _print_lines(batch.lines, batch.truncated)
            if not follow:
                return
    except RegistryError as exc:
        fail(escape(str(exc)))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def device_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The device.")],
    command: Annotated[str, typer.Argument(help="report-now, set-log-level, restart or rollback.")],
    level: Annotated[str | None, typer.Argument(help="For set-log-level: DEBUG, INFO, WARNING or ERROR.")] = None,
    timeout: Timeout = 30.0,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Send the device's agent a command and wait for its answer: report-now (close the reporting window now),
    set-log-level LEVEL, restart (the agent exits with status 75 and its service manager starts it again) or
    rollback (serve the previous model again). Every command is audited."""
    from server.cli.remote import call, remote
    from server.diagnostics import COMMANDS, clean, send_command
    from server.registry import RegistryError

    if command not in COMMANDS:
        fail(f"unknown command {escape(command)!r}: use one of {', '.join(COMMANDS)}")
    client = remote(ctx)
    if client is not None:
        client.timeout = max(client.timeout, timeout + 30)
        with err.status(f"waiting for {name} to answer {command} …"):
            got = call(client, "POST", f"/devices/{name}/commands", {
                "command": command, "timeout": timeout, **({"level": level.upper()} if level else {})})
        status, message = str(got["status"]), str(got["message"])
    else:
        actor = require_actor(ctx, data_dir, "COMMAND_DEVICE")
        try:
            with err.status(f"waiting for {name} to answer {command} …"):
                ack = send_command(open_registry(data_dir, broker), name, command, level, actor=actor,
                                   timeout=timeout)
        except RegistryError as exc:
            fail(escape(str(exc)))
        status, message = str(ack.status), ack.message
    console.print(f"{name}: {command} {status}: {clean(message) or '-'}", markup=False, emoji=False)
    if status != "done":
        raise typer.Exit(1)
