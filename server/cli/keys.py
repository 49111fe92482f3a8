"""``edgeherd keys``: the bundle-signing key pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from protocol import (
    KeyFormatError,
    key_id,
    load_private_key,
    load_public_key,
    public_key_to_text,
)
from server.cli._common import Broker, DataDir, console, fail, open_registry, require_actor
from server.keypair import PRIVATE, PUBLIC, write_key_pair

keys_app = typer.Typer(help="The server's Ed25519 bundle-signing key.", no_args_is_help=True)


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for signing.key and signing.pub.")] = Path(
        "data/keys"
    ),
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing key (devices pinned to it will refuse new bundles).")
    ] = False,
) -> None:
    """Create the signing key pair: signing.key (private, mode 0600) and signing.pub (PEM)."""
    private_path, public_path = out / PRIVATE, out / PUBLIC
    if private_path.exists() and not force:
        typer.echo(
            f"error: {private_path} already exists; devices are pinned to it. Use --force to replace it.", err=True
        )
        raise typer.Exit(1)
    key = write_key_pair(out)
    typer.echo(f"wrote {private_path} and {public_path}")
    typer.echo(f"key id     {key_id(key.public_key())}")
    typer.echo(f"pin on devices as  {public_key_to_text(key.public_key())}")


@keys_app.command("show")
def keys_show(path: Annotated[Path, typer.Argument(help="signing.key or signing.pub")]) -> None:
    """Print a key's id and the one-line form devices pin."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        typer.echo(f"error: cannot read {path}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    try:
        pub = load_private_key(data).public_key() if b"PRIVATE KEY" in data else load_public_key(data)
    except KeyFormatError as exc:
        typer.echo(f"error: {path}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"key id  {key_id(pub)}")
    typer.echo(public_key_to_text(pub))



@keys_app.command("rotate")
def keys_rotate(
    ctx: typer.Context,
    finish: Annotated[bool, typer.Option("--finish", help="Switch to the next key once every device confirmed it.")]
    = False,
    force: Annotated[bool, typer.Option("--force", help="With --finish: switch even though some devices have not "
                                        "confirmed (they are named, and catch up when they reconnect).")] = False,
    republish: Annotated[bool, typer.Option("--republish", help="Publish the newest key-set statement to every "
                                            "device again (after a broker outage).")] = False,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Rotate the bundle-signing key: publish a next key to every device, then (--finish) switch to it."""
    from server.signing_keys import KeyRotationError, finish_rotation, publish_keyset, start_rotation

    actor = require_actor(ctx, data_dir, "ROTATE_SIGNING_KEY")
    registry = open_registry(data_dir, broker)
    try:
        if republish:
            console.print(f"published the key set to {publish_keyset(registry)} device(s)")
            return
        if force and not finish:
            fail("--force goes with --finish")
        status = finish_rotation(registry, actor, force=force) if finish else start_rotation(registry, actor)
    except KeyRotationError as exc:
        fail(exc)
    if finish:
        console.print(f"key {status.active} is active (statement {status.serial}); stored manifests re-signed")
        if status.waiting:
            console.print(f"left behind, catching up when they reconnect: {', '.join(status.waiting)}")
        console.print(f"build new bundles with --key {data_dir / 'keys' / PRIVATE}")
    else:
        console.print(f"next key {status.next} published in statement {status.serial}; "
                      f"{len(status.waiting)} device(s) to confirm (see `edgeherd keys status`)")


@keys_app.command("status")
def keys_status(data_dir: DataDir = Path("data"), broker: Broker = None) -> None:
    """The active and next signing key, and which devices confirmed the newest key-set statement."""
    from server.signing_keys import KeyRotationError, key_status

    try:
        status = key_status(open_registry(data_dir, broker))
    except KeyRotationError as exc:
        fail(exc)
    console.print(f"statement {status.serial} ({status.phase})  active {status.active}  next {status.next or '-'}")
    for device in status.confirmed:
        console.print(f"  {device}  confirmed")
    for device in status.waiting:
        console.print(f"  {device}  waiting")
