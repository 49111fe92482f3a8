"""The two console scripts, run as a user runs them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import encode_model, generate_signing_key, public_key_to_text, sign_manifest
from tests.samples import manifest

BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, timeout=60,
                          env={**os.environ, "COLUMNS": "120", "NO_COLOR": "1"})


@pytest.mark.parametrize("script", ["edgeherd", "edgeherd-agent"])
def test_help_and_version(script):
    from protocol.version import __version__

    out = run(script, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout
    out = run(script, "--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"{script} {__version__}"


def test_keys_generate_writes_private_key_0600_and_refuses_to_overwrite(tmp_path):
    out = run("edgeherd", "keys", "generate", "--out", str(tmp_path / "keys"))
    assert out.returncode == 0, out.stderr
    private = tmp_path / "keys" / "signing.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    first = private.read_bytes()
    again = run("edgeherd", "keys", "generate", "--out", str(tmp_path / "keys"))
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert private.read_bytes() == first
    shown = run("edgeherd", "keys", "show", str(tmp_path / "keys" / "signing.pub"))
    assert shown.returncode == 0
    pinned = shown.stdout.strip().splitlines()[-1]
    assert pinned.startswith("ed25519:") and pinned in out.stdout


def test_agent_verify_accepts_good_and_refuses_tampered(tmp_path):
    key = generate_signing_key()
    good = tmp_path / "bundle.json"
    good.write_bytes(encode_model(sign_manifest(manifest(), key)))
    pin = public_key_to_text(key.public_key())
    out = run("edgeherd-agent", "verify", str(good), "--key", pin)
    assert out.returncode == 0, out.stderr
    assert "OK  digits 1.0.0" in out.stdout

    bad = tmp_path / "tampered.json"
    bad.write_bytes(good.read_bytes().replace(b'"version":"1.0.0"', b'"version":"6.6.6"'))
    out = run("edgeherd-agent", "verify", str(bad), "--key", pin)
    assert out.returncode == 1
    assert "does not match its contents" in out.stderr

    other = public_key_to_text(generate_signing_key().public_key())
    out = run("edgeherd-agent", "verify", str(good), "--key", other)
    assert out.returncode == 1
    assert "pinned server key" in out.stderr

    out = run("edgeherd-agent", "verify", str(tmp_path / "missing.json"), "--key", pin)
    assert out.returncode == 2
    assert "cannot read" in out.stderr
