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

