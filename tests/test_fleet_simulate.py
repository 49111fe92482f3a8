"""`edgeherd fleet simulate` on the managed broker's TLS listener: each simulated device logs in with its own
certificate, kept 0600 in a 0700 directory and reused by the next run; and the simulator's configuration refuses
what cannot work."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import stat
import threading

import pytest
from sqlmodel import Session, func, select
from typer.testing import CliRunner

from hardware.mosquitto import new_password
from server.app import ServerApp
from server.broker import DeviceCredentials
from server.cli import app as cli
from server.db.models import TelemetryRow
from server.simulate import DEVICES_PER_SOURCE, SimConfig, load_credentials, source_addresses, store_credentials
from tests.server_helpers import server_dir, wait_for
from tests.tls_device_helpers import reachable

PW = new_password()


def _mode(path) -> int:  # type: ignore[no-untyped-def]
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.integration
def test_fleet_simulate_logs_in_with_certificates_it_keeps_for_the_next_run(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEHERD_DATABASE_URL", raising=False)
    data, _ = server_dir(reachable(tmp_path) / "data")
    server = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0).start()
    try:
        # an earlier run enrolled sim-00000 while the listener took passwords, and kept it as earlier versions did
        server.registry.add_devices_bulk(["sim-00000"], "simulated", ["simulated"], custom_profile=True)
        store = data / "simulator"
        store.mkdir(mode=0o700)
        (store / "passwords.json").write_text(json.dumps({"sim-00000": "a-password-of-no-use-on-tls"}))

        def run() -> str:
            got = CliRunner().invoke(cli, ["fleet", "simulate", "--devices", "3", "--seconds", "2", "--interval",
                                           "0.5", "--processes", "2", "--data-dir", str(data)],
                                     env={"COLUMNS": "200"})
            assert got.exit_code == 0, got.output
            return got.output

        assert "0 devices could not connect" in run()
        creds = load_credentials(store)
        assert sorted(creds) == ["sim-00000", "sim-00001", "sim-00002"]
        assert all(c.certificate and c.key and c.ca_bundle and c.password is None for c in creds.values())
        assert _mode(store) == 0o700 and _mode(store / "credentials.json") == 0o600
        assert not (store / "passwords.json").exists()  # replaced: its password was re-issued as a certificate
        authority = server.registry.broker.authority
        serials = {d: authority.serials(d) for d in creds}
        assert all(creds[d].serial in serials[d] for d in creds)

        assert "0 devices could not connect" in run()  # the same certificates again: none issued
        assert {d: authority.serials(d) for d in creds} == serials

        def stored() -> bool:
            with Session(server.registry.engine) as db:
                return db.exec(select(func.count()).select_from(TelemetryRow)).one() >= 3 * 2 * 3

        wait_for(stored, 30, "both runs' windows to be stored")
    finally:
        server.stop()


def test_credentials_round_trip_and_a_corrupt_file_names_itself(tmp_path):
    creds = {"a": DeviceCredentials(password=PW),
             "b": DeviceCredentials(certificate=b"CERT", key=b"KEY", ca_bundle=b"CA", serial=7)}
    store_credentials(tmp_path / "sim", creds)
    assert load_credentials(tmp_path / "sim") == creds
    assert load_credentials(tmp_path / "nothing") == {}
    (tmp_path / "sim" / "credentials.json").write_text('{"a": 3}')
    with pytest.raises(ValueError, match=r"credentials\.json is not a simulator credentials file"):
        load_credentials(tmp_path / "sim")


@pytest.mark.parametrize(("url", "creds", "message"), [
    ("http://127.0.0.1:1883", DeviceCredentials(password=PW), "give mqtt://HOST:PORT or mqtts://HOST:PORT"),
    ("mqtt://127.0.0.1:99999", DeviceCredentials(password=PW), "give mqtt://HOST:PORT"),
    ("mqtt://127.0.0.1:1883", DeviceCredentials(certificate=b"C", key=b"K"), "needs TLS"),
    ("mqtts://127.0.0.1:8883", DeviceCredentials(certificate=b"C"), "has a certificate but no key"),
    ("mqtts://127.0.0.1:8883", DeviceCredentials(), "neither a certificate nor a password"),
])
def test_a_configuration_that_cannot_work_is_refused(url, creds, message):
    with pytest.raises(ValueError, match=message):
        SimConfig(url, {"d": creds})


def test_the_url_gives_host_port_and_tls():
    cfg = SimConfig("mqtts://gateway.lan:8883", {"d": DeviceCredentials(certificate=b"C", key=b"K")})
    assert (cfg.host, cfg.port, cfg.tls) == ("gateway.lan", 8883, True)
    cfg = SimConfig("mqtt://127.0.0.1", {"d": DeviceCredentials(password=PW)})
    assert (cfg.host, cfg.port, cfg.tls) == ("127.0.0.1", 1883, False)


@pytest.mark.integration
def test_a_shard_that_dies_fails_the_command_naming_the_shard(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEHERD_DATABASE_URL", raising=False)
    data, _ = server_dir(reachable(tmp_path) / "data")
    server = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0).start()
    try:
        got = {}

        def run() -> None:
            got["result"] = CliRunner().invoke(cli, ["fleet", "simulate", "--devices", "4", "--seconds", "600",
                                                     "--interval", "0.5", "--processes", "2", "--data-dir",
                                                     str(data)], env={"COLUMNS": "300"})

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def windows() -> bool:
            with Session(server.registry.engine) as db:
                return db.exec(select(func.count()).select_from(TelemetryRow)).one() >= 4

        wait_for(windows, 60, "the simulated devices to send windows")
        shard = next(p for p in mp.active_children() if p.name == "edgeherd-sim-1")
        assert shard.pid is not None
        os.kill(shard.pid, signal.SIGKILL)
        thread.join(60)
        assert not thread.is_alive(), "the command kept waiting after a shard died"
        result = got["result"]
        assert result.exit_code == 1, result.output
        message = " ".join(result.output.split())
        assert "shard 1 of 2 (2 devices, sim-00001 … sim-00003) died: killed by SIGKILL" in message
        assert not [p for p in mp.active_children() if p.name.startswith("edgeherd-sim-")]  # the other one ended
    finally:
        server.stop()


@pytest.mark.parametrize(("host", "devices", "expected"), [
    ("127.0.0.1", 1, ["127.0.1.1"]),
    ("127.0.0.1", DEVICES_PER_SOURCE, ["127.0.1.1"]),
    ("127.0.0.1", DEVICES_PER_SOURCE + 1, ["127.0.1.1", "127.0.1.2"]),
    ("localhost", 3 * DEVICES_PER_SOURCE, ["127.0.1.1", "127.0.1.2", "127.0.1.3"]),
    ("192.0.2.10", 100_000, [""]),  # not loopback: the system picks the source address
])
def test_loopback_connections_are_spread_over_source_addresses(host, devices, expected):
    assert source_addresses(host, devices) == expected
