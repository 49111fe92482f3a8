"""``edgeherd-agent``: the device-side command line."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hardware.process import configure_logging, version_option, wait_for_termination
from protocol import ProtocolError, decode_signed_manifest, key_id, load_public_key

if TYPE_CHECKING:
    from agent.installer import InstallHook

app = typer.Typer(
    name="edgeherd-agent",
    help="edgeherd device agent: runs signed models pushed by an edgeherd server over MQTT.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(version: Annotated[bool, version_option("edgeherd-agent")] = False) -> None:
    """edgeherd device agent."""


def _read_key(key: str) -> str | bytes:
    path = Path(key)
    if key.startswith("ed25519:") or not path.exists():
        return key
    return path.read_bytes()


@app.command()
def verify(
    manifest: Annotated[Path, typer.Argument(help="Signed manifest JSON file (as the server publishes it).")],
    key: Annotated[
        str, typer.Option("--key", "-k", help="Pinned server public key: 'ed25519:<base64>' or a PEM file.")
    ],
) -> None:
    """Check a signed manifest against the server's public key, as the agent does before installing."""
    try:
        payload = manifest.read_bytes()
    except OSError as exc:
        typer.echo(f"error: cannot read {manifest}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    try:
        pub = load_public_key(_read_key(key))
        verified = decode_signed_manifest(payload, pub)
    except ProtocolError as exc:
        typer.echo(f"error: {manifest}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"OK  {verified.model} {verified.version}  signed by key {key_id(pub)}")
    for art in verified.artifacts:
        typer.echo(f"    {art.name}: {art.target.value}/{art.precision.value}, {art.size} bytes, sha256 {art.sha256}")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="agent.toml (see docs/agent.md).")] = Path(
        "/etc/edgeherd/agent.toml"),
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Connect to the broker, install what the server wants, serve it, report. Runs until SIGTERM."""
    serve(config, log_level)


def serve(config: Path, log_level: str = "INFO", *, on_step: InstallHook | None = None) -> None:
    """``edgeherd-agent run``: start the agent from ``config`` and run it until SIGTERM or SIGINT.
    ``on_step`` is passed to the agent (:class:`agent.runtime.Agent`)."""
    from agent.config import load_config
    from agent.errors import AgentError
    from agent.runtime import Agent

    configure_logging(log_level)
    try:
        agent = Agent(load_config(config), on_step=on_step).start()
    except (AgentError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    agent.on_restart = lambda: os.kill(os.getpid(), signal.SIGTERM)  # a restart_agent command: stop as on SIGTERM
    wait_for_termination()
    agent.stop()
    if agent.restart_requested.is_set():  # the service manager (Restart=on-failure) starts the agent again
        from agent.commands import RESTART_EXIT_STATUS

        raise typer.Exit(RESTART_EXIT_STATUS)
    if agent.selfupdate.restart_wanted:  # switched to a new agent: the service manager starts the launcher again
        from agent.selfupdate import RESTART_EXIT

        raise typer.Exit(RESTART_EXIT)




def main() -> None:
    app()
