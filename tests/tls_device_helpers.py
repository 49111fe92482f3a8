"""Devices of a server's managed broker, for tests: a data directory the broker's user can reach, a device's
certificate as the files :class:`~tests.mqtt_helpers.TestClient` logs in with, and the broker's listeners as
it takes them.

The managed broker drops root to the ``mosquitto`` user before it reads its files, so every directory above
the data directory must be searchable by others (``MosquittoBroker`` refuses one that is not); pytest makes
each test's ``tmp_path`` 0700.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from server.broker import SERVER_USER, DeviceCredentials, MosquittoBroker
from tests._mosquitto import DeviceTls


def reachable(path: Path) -> Path:
    """``path`` (a directory under the system's temporary directory, made if missing), with it and its parents
    below the temporary directory searchable by others (o+x only: nobody else can list them)."""
    path.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.gettempdir()).resolve()
    here = path.resolve()
    if top not in here.parents:
        raise ValueError(f"{path} is not under {top}")
    for p in [here, *here.parents]:
        if p == top:
            break
        st = p.stat()
        if st.st_uid == os.geteuid() and not st.st_mode & 0o001:
            os.chmod(p, st.st_mode | 0o001)
    return path


def device_tls(device_id: str, creds: DeviceCredentials, directory: Path) -> DeviceTls:
    """``creds`` (a certificate device's, as ``Registry.add_devices_bulk`` returns them) written to 0600 files in
    ``directory``/``device_id``, for :class:`~tests.mqtt_helpers.TestClient`."""
    assert creds.certificate is not None and creds.key is not None and creds.ca_bundle is not None, creds
    where = directory / device_id
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = DeviceTls(device_id, where / "device.pem", where / "device.key", where / "ca.pem", creds.serial or 0)
    for path, pem in ((files.cert, creds.certificate), (files.key, creds.key), (files.ca, creds.ca_bundle)):
        path.write_bytes(b"")
        os.chmod(path, 0o600)
        path.write_bytes(pem)
    return files


@dataclass(frozen=True)
class Listeners:
    """A managed broker's two listeners as :class:`~tests.mqtt_helpers.TestClient` takes a broker: devices (TLS)
    on ``port``, the server user on ``server_port``."""

    host: str
    port: int
    server_port: int
    server_user: str = SERVER_USER


def listeners(broker: MosquittoBroker) -> Listeners:
    return Listeners("127.0.0.1", broker.port, broker.server_port)
