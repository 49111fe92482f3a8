"""The fleet commands as an operator types them (no server running)."""

from __future__ import annotations

import stat

import pytest
from typer.testing import CliRunner

from protocol import generate_signing_key, public_key_to_pem
from server.cli import app
from tests.server_helpers import server_dir

pytestmark = pytest.mark.integration


@pytest.fixture
def data(tmp_path, digits_bundle):
    d, _ = server_dir(tmp_path / "data", digits_bundle.key)
    return d


def run(*args):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_device_and_model_commands(data, digits_bundle):
    out = run("device", "add", "pi-7", "--profile", "raspberry-pi-5", "--group", "lab", "--data-dir", str(data))
    assert out.exit_code == 0, out.output
    config = data / "devices" / "pi-7" / "agent.toml"
    assert 'device_id = "pi-7"' in config.read_text() and "ed25519:" in config.read_text()
    # a fresh data dir serves devices over TLS: the device's private key is owner-only
    assert stat.S_IMODE((data / "devices" / "pi-7" / "device.key").stat().st_mode) == 0o600
    assert 'tls_cert = "device.pem"' in config.read_text()
    assert not (data / "devices" / "pi-7" / "broker-password").exists()
    again = run("device", "add", "pi-7", "--profile", "raspberry-pi-5", "--data-dir", str(data))
    assert again.exit_code == 1 and "already exists" in again.output
    bad = run("device", "add", "Pi_7", "--profile", "x", "--data-dir", str(data))
    assert bad.exit_code == 1 and "not a valid device name" in bad.output
    listed = run("device", "list", "--data-dir", str(data))
    assert "pi-7" in listed.output and "raspberry-pi-5" in listed.output

    pushed = run("model", "push", str(digits_bundle.dir), "--data-dir", str(data))
    assert pushed.exit_code == 0 and "registered digits 1.0.0" in pushed.output
    assert "digits" in run("model", "list", "--data-dir", str(data)).output
    shown = run("model", "show", "digits:1.0.0", "--data-dir", str(data))
    assert "digits-onnx-int8" in shown.output and "dataset_sha256" in shown.output
    missing = run("model", "show", "digits:9.9.9", "--data-dir", str(data))
    assert missing.exit_code == 1 and "no model digits:9.9.9" in missing.output

    deploy = run("deploy", "digits:1.0.0", "--device", "pi-7", "--data-dir", str(data))
    assert deploy.exit_code == 1 and "is `edgeherd server run` running?" in " ".join(deploy.output.split())


def test_push_refuses_a_bundle_signed_by_another_key(data, digits_bundle, tmp_path):
    other = generate_signing_key()
    (data / "keys" / "signing.pub").write_bytes(public_key_to_pem(other.public_key()))
    out = run("model", "push", str(digits_bundle.dir), "--data-dir", str(data))
    assert out.exit_code == 1 and "pinned server key" in " ".join(out.output.split())


def test_push_refuses_the_same_version_with_other_contents(data, digits_bundle, tmp_path):
    import json
    import shutil

    from protocol import Manifest, decode_model, encode_model, sign_manifest

    assert run("model", "push", str(digits_bundle.dir), "--data-dir", str(data)).exit_code == 0
    other = tmp_path / "other"
    shutil.copytree(digits_bundle.dir, other)
    doc = json.loads(digits_bundle.signed.manifest.model_dump_json(by_alias=True, exclude_none=True))
    doc["description"] = "the same version number, different contents"
    altered = sign_manifest(decode_model(Manifest, json.dumps(doc).encode()), digits_bundle.key)
    (other / "manifest.json").write_bytes(encode_model(altered))
    out = run("model", "push", str(other), "--data-dir", str(data))
    assert out.exit_code == 1 and "already registered with other contents" in " ".join(out.output.split())
    tampered = tmp_path / "tampered"
    shutil.copytree(digits_bundle.dir, tampered)
    blob = next((tampered / "artifacts").iterdir())
    blob.write_bytes(b"\0" + blob.read_bytes()[1:])
    out = run("model", "push", str(tampered), "--data-dir", str(data))
    assert out.exit_code == 1 and "not matching their sha256" in " ".join(out.output.split())


def test_device_add_refuses_an_unknown_profile_unless_it_is_marked_custom(tmp_path):
    from sqlmodel import Session

    from server import audit
    from server.registry import Registry, RegistryError

    data, _ = server_dir(tmp_path / "data")
    refused = run("device", "add", "bb-1", "--profile", "banana-board", "--data-dir", str(data))
    said = " ".join(refused.output.split())
    assert refused.exit_code == 1, said
    assert "no hardware profile 'banana-board'; profiles: jetson-agx-orin, jetson-orin-nano," in said
    assert "x86-64-cpu, x86-64-nvidia" in said and "edgeherd device add --custom-profile" in said
    reg = Registry(data)
    with pytest.raises(RegistryError, match=r"no hardware profile 'banana-board'; profiles: .*raspberry-pi-5"):
        reg.add_device("bb-2", "banana-board")
    with pytest.raises(RegistryError, match=r"no hardware profile 'banana-board'; profiles: .*raspberry-pi-5"):
        reg.add_devices_bulk(["bb-3", "bb-4"], "banana-board")
    with pytest.raises(RegistryError, match="raspberry-pi-5 is a hardware profile, not a custom one"):
        reg.add_device("bb-2", "raspberry-pi-5", custom_profile=True)
    passwd = data / "broker" / "passwd"
    assert reg.devices() == [] and not (data / "devices").exists()  # nothing enrolled, no credentials made
    assert not passwd.exists() or "bb-" not in passwd.read_text()

    accepted = run("device", "add", "bb-1", "--profile", "banana-board", "--custom-profile", "--data-dir", str(data))
    assert accepted.exit_code == 0, accepted.output
    assert "with the custom profile banana-board (no latency budget)" in " ".join(accepted.output.split())
    assert 'profile = "banana-board"' in (data / "devices" / "bb-1" / "agent.toml").read_text()
    reg.add_devices_bulk(["bb-3", "bb-4"], "banana-board", custom_profile=True)
    reg.add_device("pi-1", "raspberry-pi-5")
    rows = {line.split()[0]: line for line in run("device", "list", "--data-dir", str(data)).output
            .replace("│", " ").splitlines() if line.split()}
    assert "banana-board (custom)" in rows["bb-1"] and "banana-board (custom)" in rows["bb-3"]
    assert "raspberry-pi-5" in rows["pi-1"] and "custom" not in rows["pi-1"]
    with Session(reg.engine) as db:
        details = [(e.action, e.detail.get("custom_profile")) for e in reversed(audit.entries(db))]
    assert details == [("device.add", True), ("device.add_bulk", True), ("device.add", None)]
    reg.engine.dispose()
