"""The agent's side of credential rotation without a broker: what is stored where, in which order passwords are
tried, when the previous ones are forgotten; and the command that carries a new password."""

from __future__ import annotations

import stat
from datetime import datetime, timezone

import pytest

from agent.config import AgentConfig
from agent.credentials import KEEP_PREVIOUS, Credentials
from agent.errors import ConfigError
from protocol import Command, CommandKind, InvalidMessage, decode, encode

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
KEY = "ed25519:Jpn69PZ51Vluwz2vQYcuWf+9zuqAACue9tnTfwOnUkk="


def _cfg(tmp_path, **kw) -> AgentConfig:
    if "password" not in kw:
        kw.setdefault("password_file", tmp_path / "broker-password")
    return AgentConfig(device_id="pi-1", broker_url="mqtt://b:1883", server_key=KEY, data_dir=tmp_path / "data", **kw)


def test_rotation_keeps_the_replaced_password_until_the_new_one_is_accepted(tmp_path):
    (tmp_path / "broker-password").write_text("old-password-0123456789\n")
    creds = Credentials(_cfg(tmp_path))
    assert creds.candidates() == ["old-password-0123456789"]
    creds.rotate("new-password-0123456789")
    assert (tmp_path / "broker-password").read_text() == "new-password-0123456789\n"
    assert (tmp_path / "broker-password.previous").read_text() == "old-password-0123456789\n"
    for f in ("broker-password", "broker-password.previous"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o600
    assert creds.candidates() == ["new-password-0123456789", "old-password-0123456789"]
    creds.accepted(1)  # the server never swapped: keep both
    assert creds.candidates() == ["new-password-0123456789", "old-password-0123456789"]
    creds.accepted(0)
    assert creds.candidates() == ["new-password-0123456789"]
    assert not (tmp_path / "broker-password.previous").exists()


def test_unfinished_rotations_in_a_row_keep_every_password_that_may_still_work(tmp_path):
    (tmp_path / "broker-password").write_text("p0-0123456789abcdef\n")
    creds = Credentials(_cfg(tmp_path))
    for i in range(1, KEEP_PREVIOUS + 3):
        creds.rotate(f"p{i}-0123456789abcdef")
    got = creds.candidates()
    assert got[0] == f"p{KEEP_PREVIOUS + 2}-0123456789abcdef"
    assert got[1:] == [f"p{i}-0123456789abcdef" for i in range(KEEP_PREVIOUS + 1, 1, -1)]  # newest first, capped
    creds.rotate(got[0])  # the same password again changes nothing
    assert creds.candidates() == got


def test_an_inline_password_cannot_be_rotated(tmp_path):
    creds = Credentials(_cfg(tmp_path, password="inline-password-0123"))  # noqa: S106
    assert not creds.rotatable and creds.candidates() == ["inline-password-0123"]
    with pytest.raises(ConfigError, match="not in a file"):
        creds.rotate("new-password-0123456789")


def test_rotate_credentials_command_carries_exactly_a_password():
    cmd = Command(command_id="0" * 32, kind=CommandKind.ROTATE_CREDENTIALS,
                  args={"password": "s3cret-s3cret-s3cret-s3cret"}, issued_at=NOW)
    assert decode(Command, encode(cmd)) == cmd
    for args in ({}, {"password": "short"}, {"password": 12345678901234567}, {"password": " padded-password-123 "},
                 {"password": "x" * 257}, {"password": "s3cret-s3cret-s3cret", "extra": 1},
                 {"password": "line\nbreak-0123456789"}):
        with pytest.raises(InvalidMessage):
            decode(Command, encode(cmd.model_construct(**{**cmd.__dict__, "args": args})))


def test_an_agent_without_a_certificate_of_its_own_rejects_one(tmp_path):
    """A certificate rotation for an agent that logs in with a password: rejected, saying why, nothing written."""
    from agent.runtime import Agent
    from server.pki import Authority

    (tmp_path / "broker-password").write_text("old-password-0123456789\n")
    agent = Agent(_cfg(tmp_path, profile="x86-64-cpu"), api=False)
    issued = Authority.open(tmp_path / "server").issue_device("pi-1")
    status, message = agent.commands.rotate_certificate(issued.certificate.decode(), issued.key.decode(),
                                                        issued.ca_bundle.decode())
    assert status == "rejected" and "without a certificate of its own (tls_cert and tls_key" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broker-password", "data", "server"]
    agent.outbox.close()
