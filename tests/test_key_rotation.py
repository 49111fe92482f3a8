"""Rotating the bundle-signing key: key-set statements (protocol/keyset.py), the agent's trust (agent/trust.py)
and the server's rotation (server/signing_keys.py), end to end on a real broker, database and agents."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlmodel import Session, select

from agent.trust import KEYSET_FILE, Trust
from protocol import (
    DesiredState,
    InvalidMessage,
    KeyEntry,
    KeySet,
    SignatureError,
    SignedKeySet,
    SignedManifest,
    decode_model,
    encode_model,
    generate_signing_key,
    key_id,
    load_private_key,
    public_key_to_text,
    sign_keyset,
    sign_manifest,
    verify_keyset,
)
from server import audit
from server.app import ServerApp
from server.db.models import AuditEntry, Device, KeyStatement, ModelVersion
from server.errors import RegistryError
from server.signing_keys import KeyRotationError, current_statement, finish_rotation, key_status, start_rotation
from tests.agent_harness import AgentProcess
from tests.model_helpers import lookup_onnx, onnx_bundle, onnx_manifest
from tests.server_helpers import server_dir, wait_for
from tests.tls_device_helpers import reachable

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _entry(key, state):
    return KeyEntry(key=public_key_to_text(key.public_key()), state=state)


def _keyset(serial, *entries):
    return KeySet(serial=serial, issued_at=NOW, keys=list(entries))


# --- the statement ---------------------------------------------------------------------------------------------


def test_a_statement_verifies_against_its_signer_and_round_trips():
    old, new = generate_signing_key(), generate_signing_key()
    signed = sign_keyset(_keyset(1, _entry(old, "active"), _entry(new, "next")), old)
    again = decode_model(SignedKeySet, encode_model(signed))
    ks = verify_keyset(again, {key_id(old.public_key()): old.public_key()})
    assert ks.serial == 1 and set(ks.trusted()) == {key_id(old.public_key()), key_id(new.public_key())}
    assert key_id(ks.active()) == key_id(old.public_key())


@pytest.mark.parametrize(("states", "why"), [
    (("next",), "exactly one active"),
    (("active", "active"), "exactly one active"),
    (("active", "next", "next"), "at most one next"),
])
def test_a_statement_names_one_active_key_and_at_most_one_next(states, why):
    keys = [_entry(generate_signing_key(), s) for s in states]
    with pytest.raises(ValueError, match=why):
        _keyset(1, *keys)


def test_the_same_key_twice_and_a_serial_of_zero_are_refused():
    k = generate_signing_key()
    with pytest.raises(ValueError, match="each key once"):
        _keyset(1, _entry(k, "active"), _entry(k, "retired"))
    with pytest.raises(ValueError):
        _keyset(0, _entry(k, "active"))


def test_an_unknown_signer_an_altered_statement_and_a_manifest_signature_are_refused():
    old, other = generate_signing_key(), generate_signing_key()
    trusted = {key_id(old.public_key()): old.public_key()}
    forged = sign_keyset(_keyset(2, _entry(other, "active")), other)
    with pytest.raises(SignatureError, match="does not trust"):
        verify_keyset(forged, trusted)
    good = sign_keyset(_keyset(2, _entry(old, "active"), _entry(other, "next")), old)
    altered = good.model_copy(update={"keyset": _keyset(2, _entry(other, "active"), _entry(old, "next"))})
    with pytest.raises(SignatureError, match="does not match"):
        verify_keyset(altered, trusted)
    # a manifest signature never passes for a statement's: the statement's bytes carry their own prefix
    manifest_sig = sign_manifest(onnx_manifest(lookup_onnx(Path("/tmp") / f"k{id(old)}.onnx")), old).signature
    with pytest.raises(SignatureError):
        verify_keyset(good.model_copy(update={"signature": manifest_sig}), trusted)


def test_an_oversized_statement_is_refused_before_parsing():
    with pytest.raises(InvalidMessage):
        decode_model(SignedKeySet, b"{" + b" " * (SignedKeySet.MAX_BYTES + 1) + b"}")


# --- the agent's trust -----------------------------------------------------------------------------------------


def test_trust_takes_a_newer_statement_keeps_it_and_refuses_replays_forgeries_and_retired_keys(tmp_path):
    old, new, stranger = generate_signing_key(), generate_signing_key(), generate_signing_key()
    manifest = onnx_manifest(lookup_onnx(tmp_path / "m.onnx"))
    trust = Trust(old.public_key(), tmp_path)
    assert trust.serial == 0 and trust.verify(sign_manifest(manifest, old)) == manifest
    with pytest.raises(SignatureError, match="does not trust"):
        trust.verify(sign_manifest(manifest, new))

    rotating = sign_keyset(_keyset(1, _entry(old, "active"), _entry(new, "next")), old)
    assert trust.accept(rotating) and not trust.accept(rotating)  # the same one again changes nothing
    assert trust.verify(sign_manifest(manifest, new)) == manifest  # next: accepted already
    done = sign_keyset(_keyset(2, _entry(old, "retired"), _entry(new, "active")), old)
    assert trust.accept(done)

    reloaded = Trust(old.public_key(), tmp_path)  # persisted: a restart keeps it
    assert reloaded.serial == 2
    with pytest.raises(SignatureError, match="retired"):
        reloaded.verify(sign_manifest(manifest, old))
    # a model installed before the switch still loads from its slot
    assert reloaded.verify(sign_manifest(manifest, old), installed=True) == manifest
    with pytest.raises(SignatureError, match="not newer"):
        reloaded.accept(rotating)  # replay of a lower serial
    with pytest.raises(SignatureError, match="does not trust"):
        reloaded.accept(sign_keyset(_keyset(3, _entry(stranger, "active")), stranger))
    with pytest.raises(SignatureError, match="does not trust"):  # the retired key can no longer speak either
        reloaded.accept(sign_keyset(_keyset(3, _entry(old, "active")), old))
    assert decode_model(SignedKeySet, (tmp_path / KEYSET_FILE).read_bytes()) == done


# --- end to end ------------------------------------------------------------------------------------------------


class Fleet:
    """A real server (managed Mosquitto, SQLite) and real agent processes over TLS."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data, self.key = server_dir(reachable(tmp) / "server")
        self.app = ServerApp(self.data, metrics_port=0, drift_interval=3600).start()
        self.reg = self.app.registry
        self.agents: dict[str, AgentProcess] = {}
        self.configs: dict[str, Path] = {}

    def enrol(self, device_id: str) -> None:
        enrolled = self.reg.add_device(device_id, "x86-64", ["lab"], custom_profile=True)
        self.configs[device_id] = shutil.copytree(enrolled.agent_config.parent, self.tmp / device_id) / "agent.toml"

    def start(self, device_id: str) -> None:
        self.agents[device_id] = AgentProcess(self.configs[device_id], self.tmp / f"{device_id}.log", env={
            "EDGEHERD_AGENT_DATA_DIR": str(self.agent_dir(device_id)), "EDGEHERD_AGENT_API_PORT": "0",
            "EDGEHERD_AGENT_WINDOW_SECONDS": "3600"})

    def stop(self, device_id: str) -> None:
        self.agents.pop(device_id).stop()

    def agent_dir(self, device_id: str) -> Path:
        return self.tmp / f"{device_id}-data"

    def device(self, device_id: str) -> Device:
        with Session(self.reg.engine) as db:
            found = db.get(Device, device_id)
            assert found is not None
            return found

    def wait_running(self, device_id: str, digest: str) -> None:
        def running() -> bool:
            d = self.device(device_id)
            return d.running_manifest == digest and d.install_step == "done"

        wait_for(running, 120, f"{device_id} to run {digest[:12]}")

    def wait_serial(self, device_id: str, serial: int) -> None:
        wait_for(lambda: self.device(device_id).keyset_serial == serial, 60,
                 f"{device_id} to confirm key-set statement {serial}")

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.app.stop()


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


@pytest.mark.integration
def test_a_key_rotation_with_a_device_offline_during_it(fleet, tmp_path):
    old_key = fleet.key
    model_file = lookup_onnx(tmp_path / "lookup.onnx", clip=True)
    v1, _, d1 = onnx_bundle(tmp_path / "v1", old_key, model_file, version="1.0.0")
    fleet.reg.push_model(v1)
    for device in ("dev-a", "dev-b"):
        fleet.enrol(device)
        fleet.start(device)
        fleet.reg.deploy("lookup", "1.0.0", device)
    for device in ("dev-a", "dev-b"):
        fleet.wait_running(device, d1)

    fleet.stop("dev-b")  # offline for the whole first step
    wait_for(lambda: fleet.device("dev-b").status == "offline", 60, "dev-b to be seen offline")
    status = start_rotation(fleet.reg, "alice")
    assert status.serial == 1 and status.phase == "rotating" and status.active == key_id(old_key.public_key())
    new_id = status.next
    assert (fleet.data / "keys" / "next.key").is_file()
    fleet.wait_serial("dev-a", 1)
    assert key_status(fleet.reg).waiting == ["dev-b"]
    with pytest.raises(KeyRotationError, match="dev-b"):  # the switch waits for every device
        finish_rotation(fleet.reg, "alice")
    assert key_id(load_private_key((fleet.data / "keys" / "signing.key").read_bytes()).public_key()) \
        == key_id(old_key.public_key())

    fleet.start("dev-b")  # back: it finds the statement in its retained desired state
    fleet.wait_serial("dev-b", 1)
    assert key_status(fleet.reg).waiting == []
    status = finish_rotation(fleet.reg, "alice")
    assert (status.serial, status.phase, status.active, status.next) == (2, "done", new_id, None)
    for device in ("dev-a", "dev-b"):
        fleet.wait_serial(device, 2)
    new_key = load_private_key((fleet.data / "keys" / "signing.key").read_bytes())
    assert key_id(new_key.public_key()) == new_id and not (fleet.data / "keys" / "next.key").exists()
    with Session(fleet.reg.engine) as db:  # stored manifests re-signed, their digests unchanged
        stored = decode_model(SignedManifest, db.exec(select(ModelVersion)).one().signed_manifest)
        assert stored.signature.key_id == new_id
        actions = [e.action for e in db.exec(select(AuditEntry)) if e.action.startswith("keys.")]
        assert actions == ["keys.rotate", "keys.finish"]
        assert audit.verify(db).ok
    assert (fleet.device("dev-a").running_manifest, fleet.device("dev-b").running_manifest) == (d1, d1)

    # a bundle built afterwards with the new signing.key installs on both
    v2, _, d2 = onnx_bundle(tmp_path / "v2", new_key, model_file, version="2.0.0")
    fleet.reg.push_model(v2)
    for device in ("dev-a", "dev-b"):
        fleet.reg.deploy("lookup", "2.0.0", device)
    for device in ("dev-a", "dev-b"):
        fleet.wait_running(device, d2)

    # the retired key: the registry refuses its bundle, and so does an agent sent one anyway
    v3, signed_old, _ = onnx_bundle(tmp_path / "v3", old_key, model_file, version="3.0.0")
    with pytest.raises(RegistryError):
        fleet.reg.push_model(v3)
    with Session(fleet.reg.engine) as db:
        statement = current_statement(db)
        first = decode_model(SignedKeySet, db.get(KeyStatement, 1).statement)  # type: ignore[union-attr]
    assert statement is not None and first.keyset.serial == 1
    generation = fleet.device("dev-a").desired_generation + 1
    stranger = generate_signing_key()
    forged = sign_keyset(_keyset(3, _entry(stranger, "active")), stranger)
    with fleet.reg.client() as bus:
        for n, keyset in enumerate((forged, first, statement)):
            bus.confirm(bus.publish_desired(DesiredState(
                device_id="dev-a", generation=generation + n, issued_at=datetime.now(timezone.utc),
                bundle=signed_old if n == 2 else None, artifact=signed_old.manifest.artifacts[0].name if n == 2
                else None, keyset=keyset)))

    record = fleet.agent_dir("dev-a") / "install.json"
    wait_for(lambda: "retired" in record.read_text(), 60, "dev-a to refuse the bundle of the retired key")
    log = (tmp_path / "dev-a.log").read_text(errors="replace")
    assert "refused a key-set statement" in log and "does not trust" in log and "not newer" in log
    held = decode_model(SignedKeySet, (fleet.agent_dir("dev-a") / KEYSET_FILE).read_bytes())
    assert held == statement
    assert fleet.device("dev-a").running_manifest == d2  # still serving what it ran
