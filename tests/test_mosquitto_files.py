from __future__ import annotations

import base64

import pytest

from hardware.mosquitto import (
    ARTIFACT_PATTERN,
    DEVICE_PATTERN,
    hash_password,
    render_acl,
    render_config,
    render_password_file,
    verify_password,
)


def test_password_hash_format_and_verification():
    h = hash_password("s3cret", salt=b"\x01" * 12)
    _, alg, iters, salt, key = h.split("$")
    assert (alg, iters) == ("7", "101")
    assert base64.b64decode(salt) == b"\x01" * 12
    assert len(base64.b64decode(key)) == 64
    assert verify_password("s3cret", h)
    assert not verify_password("s3cret!", h)
    assert hash_password("s3cret") != hash_password("s3cret")  # salted


def test_password_file_refuses_plain_passwords_and_bad_names():
    with pytest.raises(ValueError, match=r"\$7\$"):
        render_password_file({"dev-a": "plain"})
    with pytest.raises(ValueError, match="user name"):
        render_password_file({"dev:a": hash_password("x")})
    text = render_password_file({"b": hash_password("x"), "a": hash_password("y")})
    assert [line.split(":")[0] for line in text.splitlines()] == ["a", "b"]


def test_acl_confines_devices_and_grants_server_the_tree():
    acl = render_acl(["edgeherd-server"])
    assert "user edgeherd-server\ntopic readwrite edgeherd/v1/#" in acl
    patterns = [line for line in acl.splitlines() if line.startswith("pattern ")]
    assert patterns == [DEVICE_PATTERN, ARTIFACT_PATTERN]  # after every user section: they apply to all users
    assert DEVICE_PATTERN == "pattern readwrite edgeherd/v1/devices/%u/#"
    assert ARTIFACT_PATTERN == "pattern read edgeherd/v1/artifacts/+/chunk"  # listen only, never publish


def test_config_is_closed_by_default(tmp_path):
    conf = render_config(port=18830, password_file=tmp_path / "p", acl_file=tmp_path / "a")
    assert "allow_anonymous false" in conf
    assert "listener 18830 127.0.0.1" in conf
    with pytest.raises(ValueError):
        render_config(port=0, password_file=tmp_path / "p", acl_file=tmp_path / "a")


def test_config_binds_client_ids_on_the_devices_listener_only(tmp_path):
    conf = render_config(port=18830, host="0.0.0.0", server_port=18831, password_file=tmp_path / "p",  # noqa: S104
                         acl_file=tmp_path / "a", persistence_dir=tmp_path / "store")
    lines = [line for line in conf.splitlines() if line and not line.startswith("#")]
    # a listener's options follow its `listener` line: the server's listener has none, the devices' binds ids
    server, devices = lines.index("listener 18831 127.0.0.1"), lines.index("listener 18830 0.0.0.0")
    assert server < devices and lines[devices + 1:] == ["use_username_as_clientid true"]
    assert lines.count("use_username_as_clientid true") == 1
    assert f"persistence_location {tmp_path / 'store'}/" in lines and "persistence true" in lines
    assert lines.index("persistence true") < server  # a global option, before the listeners
    with pytest.raises(ValueError, match="port of its own"):
        render_config(port=18830, server_port=18830, password_file=tmp_path / "p", acl_file=tmp_path / "a")
    with pytest.raises(ValueError, match="server_port"):
        render_config(port=18830, server_port=70000, password_file=tmp_path / "p", acl_file=tmp_path / "a")
