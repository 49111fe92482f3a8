"""The server's certificate authority (server/pki.py): what it issues, revokes and re-issues, and a CA rotation
on a real broker that strands no device that was moved in time."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from server.pki import Authority, PkiError, check_host_name
from server.registry import Registry, RegistryError
from tests._mosquitto import DeviceTls
from tests.mqtt_helpers import HandshakeRefused, TestClient
from tests.server_helpers import server_dir


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _bundle(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def test_the_authority_is_created_once_with_a_private_key(tmp_path):
    auth = Authority.open(tmp_path)
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    (ca,) = auth.cas()
    assert ca.role == "current"
    assert stat.S_IMODE((tmp_path / "pki" / "ca" / f"{ca.id}.key").stat().st_mode) == 0o600
    assert [c.id for c in Authority.open(tmp_path).cas()] == [ca.id]  # opened again: the same CA


def test_a_device_certificate_names_the_device_and_chains_to_the_bundle(tmp_path):
    auth = Authority.open(tmp_path)
    issued = auth.issue_device("pi-7")
    cert = _cert(issued.certificate)
    (ca,) = _bundle(issued.ca_bundle)
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-7"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH])
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.serial_number == issued.serial and auth.serials("pi-7") == [issued.serial]
    with pytest.raises(PkiError, match="not a valid device name"):
        auth.issue_device("Pi/7")


def test_revocation_lands_in_the_crl_of_the_issuing_ca(tmp_path):
    auth = Authority.open(tmp_path)
    keep, drop = auth.issue_device("pi-1"), auth.issue_device("pi-1")
    assert auth.revoke_device("pi-1", keep=keep.serial) == [drop.serial]
    (crl,) = [x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + part)
              for part in auth.crl.read_bytes().split(b"-----BEGIN X509 CRL-----")[1:]]
    assert crl.get_revoked_certificate_by_serial_number(drop.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(keep.serial) is None
    assert crl.next_update_utc is not None and crl.next_update_utc > dt.datetime.now(dt.timezone.utc) + \
        dt.timedelta(days=365)  # never stale: a stale CRL would lock every device out
    assert auth.serials("pi-1") == [keep.serial] and auth.serials("pi-1", revoked=True) == [drop.serial]
    assert auth.revoke([drop.serial]) == []  # once


def test_the_broker_certificate_follows_its_names(tmp_path):
    auth = Authority.open(tmp_path)
    assert auth.broker_certificate(["gateway.lan", "10.0.0.5", "localhost"])
    first = _cert(auth.broker_cert.read_bytes())
    names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["gateway.lan", "localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert not auth.broker_certificate(["gateway.lan", "10.0.0.5", "localhost"])  # unchanged: kept
    assert auth.broker_certificate(["gw2.lan", "localhost"])  # changed: re-issued
    assert _cert(auth.broker_cert.read_bytes()).serial_number != first.serial_number
    assert stat.S_IMODE(auth.broker_key.stat().st_mode) == 0o600


@pytest.mark.parametrize("name, ok", [("gateway.lan", True), ("10.1.2.3", True), ("::1", True), ("PI.Local.", True),
                                      ("", False), ("bad name", False), ("-x.lan", False), ("a" * 64 + ".lan", False),
                                      ("x_y.lan", False)])
def test_public_host_names(name, ok):
    if ok:
        assert check_host_name(name)
    else:
        with pytest.raises(PkiError, match="neither an IP address nor a host name"):
            check_host_name(name)


def test_a_device_may_not_take_the_server_users_name(tmp_path):
    data, _ = server_dir(tmp_path / "server")
    reg = Registry(data)
    with pytest.raises(RegistryError, match="server's own broker user"):
        reg.add_device("edgeherd-server", "raspberry-pi-5")
    with pytest.raises(RegistryError, match="not valid device names"):
        reg.add_devices_bulk(["edgeherd-server"], "raspberry-pi-5")
    reg.engine.dispose()


class _Addr:
    def __init__(self, reg: Registry) -> None:
        self.host, self.port = "127.0.0.1", reg.broker.port
        self.server_port, self.server_user = reg.broker.server_port, "edgeherd-server"


def _device(where: Path, device_id: str, certificate: bytes, key: bytes, bundle: bytes) -> DeviceTls:
    where.mkdir(parents=True, exist_ok=True)
    creds = DeviceTls(device_id, where / "device.pem", where / "device.key", where / "ca.pem", 0)
    creds.cert.write_bytes(certificate)
    creds.key.write_bytes(key)
    creds.ca.write_bytes(bundle)
    return creds


def _connects(reg: Registry, creds: DeviceTls) -> bool:
    try:
        TestClient(_Addr(reg), creds.device_id, creds, client_id="x", timeout=5).close()  # type: ignore[arg-type]
    except (HandshakeRefused, ssl.SSLError, OSError):
        return False
    return True


@pytest.mark.integration
def test_a_ca_rotation_strands_no_device_that_was_moved(tmp_path):
    from server.cli import app

    data, _ = server_dir(tmp_path / "server")
    reg = Registry(data)
    reg.broker.start()
    cli = CliRunner()
    try:
        a = reg.add_device("dev-a", "raspberry-pi-5")
        old_a = _device(tmp_path / "a-old", "dev-a", *(
            (a.agent_config.parent / n).read_bytes() for n in ("device.pem", "device.key", "ca.pem")))
        assert _connects(reg, old_a)

        started = cli.invoke(app, ["server", "ca", "rotate", "--data-dir", str(data)])
        assert started.exit_code == 0, started.output
        assert "is current; the previous one stays trusted" in started.output
        time.sleep(0.3)  # the broker re-reads its files on SIGHUP
        assert _connects(reg, old_a), "a device with the old CA's certificate was cut off at once"
        # a device enrolled now gets the new CA's certificate and a bundle of both
        b = reg.add_device("dev-b", "raspberry-pi-5")
        new_b = _device(tmp_path / "b", "dev-b", *(
            (b.agent_config.parent / n).read_bytes() for n in ("device.pem", "device.key", "ca.pem")))
        assert len(_bundle(new_b.ca.read_bytes())) == 2
        assert _connects(reg, new_b)

        shown = cli.invoke(app, ["server", "ca", "show", "--data-dir", str(data)], env={"COLUMNS": "250"})
        assert shown.exit_code == 0 and "1 device(s) hold only certificates from" in shown.output, shown.output
        refused = cli.invoke(app, ["server", "ca", "rotate", "--finish", "--data-dir", str(data)])
        assert refused.exit_code == 1 and "dev-a" in refused.output

        moved = reg.reissue_credentials("dev-a")  # what rotate-credentials sends over the device's session
        assert moved.certificate is not None and moved.key is not None and moved.ca_bundle is not None
        new_a = _device(tmp_path / "a-new", "dev-a", moved.certificate, moved.key, moved.ca_bundle)
        finished = cli.invoke(app, ["server", "ca", "rotate", "--finish", "--data-dir", str(data)])
        assert finished.exit_code == 0, finished.output
        time.sleep(0.3)
        assert _connects(reg, new_a) and _connects(reg, new_b)  # moved in time: still on the broker
        assert not _connects(reg, old_a)  # an old certificate and a bundle of the old CA only: cut off
        (current,) = reg.broker.authority.cas()
        broker_cert = _cert(reg.broker.authority.broker_cert.read_bytes())
        assert f"edgeherd CA {current.id}" in broker_cert.issuer.rfc4514_string()
    finally:
        reg.broker.stop()
        reg.engine.dispose()
