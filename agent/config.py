"""The agent's configuration: a TOML file plus ``EDGEHERD_AGENT_*`` environment overrides.

Every field is documented below; an unknown key, a wrong type or a missing
required key is an error naming the key, never a silent default.

.. code-block:: toml

    device_id = "pi5-kitchen"
    broker_url = "mqtts://broker.example:8883"    # mqtt:// without TLS
    tls_ca = "ca.pem"                             # the CA pinned for the broker's certificate
    tls_cert = "device.pem"                       # this device's certificate and key (or a password_file)
    tls_key = "device.key"
    server_key = "ed25519:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    data_dir = "/var/lib/edgeherd"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError
from protocol.ids import DEVICE_ID_PATTERN
from protocol.tomlfile import read_toml

__all__ = ["AgentConfig", "load_config"]

ENV_PREFIX = "EDGEHERD_AGENT_"


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: This device's id: its MQTT user name and topic level (a-z, 0-9, '-').
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    #: Broker to connect to: mqtt://host[:1883] or mqtts://host[:8883].
    broker_url: str
    #: Broker user name; defaults to the device id.
    username: str | None = None
    #: Broker password, inline. Prefer ``password_file``.
    password: str | None = None
    #: File holding the broker password (first line), readable only by the agent.
    password_file: Path | None = None
    #: CA bundle the broker's certificate must be signed by (mqtts only): only these CAs are trusted, and the
    #: certificate must name the host in ``broker_url``. Without it, the system's CAs (a broker with a public
    #: certificate). Required with ``tls_cert``.
    tls_ca: Path | None = None
    #: This device's certificate (its common name is the device id) and private key, PEM, for a broker that
    #: authenticates devices by certificate (mqtts only). A credential rotation replaces them, keeping the
    #: replaced ones as ``<file>.previous`` until the broker accepts the new ones (agent/credentials.py).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: The server's bundle-signing public key, pinned: 'ed25519:<base64>' or a PEM file path.
    server_key: str
    #: Where slots, downloads, the install record and the offline queue live.
    data_dir: Path
    #: Local inference API address (127.0.0.1 only by default); port 0 disables the API.
    api_host: str = "127.0.0.1"
    api_port: int = Field(8470, ge=0, le=65535)
    #: Hardware profile name, or "auto" to detect it.
    profile: str = "auto"
    #: A reporting window closes after this many seconds or samples, whichever comes first.
    window_seconds: float = Field(60.0, gt=0, le=86400)
    window_samples: int = Field(10_000, ge=1, le=10_000_000)
    #: Windows kept while offline; beyond this the oldest are dropped (and counted).
    queue_max_windows: int = Field(10_000, ge=10, le=10_000_000)
    #: A report the broker acknowledged but the server has not confirmed (receipt) within this many
    #: seconds is sent again; the server stores it once.
    receipt_timeout_s: float = Field(30.0, ge=1, le=86400)
    #: MQTT keep-alive in seconds; the broker marks the device offline after 1.5 × this.
    keepalive: int = Field(30, ge=5, le=3600)
    #: When the agent has sent the server no state, hello or report for this many seconds, it republishes its
    #: state, so the server can tell a connected device from one whose broker went away with it (a server counts
    #: a device silent for EDGEHERD_STALE_AFTER_S, 180 s by default, as offline: keep this well below).
    heartbeat_s: float = Field(60.0, ge=1, le=3600)
    #: Threads per inference session.
    threads: int = Field(1, ge=1, le=64)
    #: Artifact chunk size asked of the server, in KiB (4-256): larger moves a rollout wave faster,
    #: smaller loses less to a dropped connection on a slow link.
    chunk_kib: int = Field(256, ge=4, le=256)
    #: Largest request body the local API accepts.
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=1024**3)

    @field_validator("broker_url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must look like mqtt://host:1883 or mqtts://host:8883")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return v

    @model_validator(mode="after")
    def _credentials(self) -> AgentConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        given = [k for k in ("tls_ca", "tls_cert", "tls_key") if getattr(self, k) is not None]
        if given and not self.tls:
            raise ValueError(f"{', '.join(given)} need a TLS broker_url (mqtts://host:8883), not {self.broker_url}")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("tls_ca is required with tls_cert and tls_key: it pins the CA that signed the broker's "
                             "certificate (the server's ca-bundle.pem, written next to the device's certificate at "
                             "enrolment)")
        return self

    @property
    def broker_host(self) -> str:
        return urlsplit(self.broker_url).hostname or ""

    @property
    def broker_port(self) -> int:
        parts = urlsplit(self.broker_url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.broker_url).scheme == "mqtts"

    def broker_password(self) -> str | None:
        if self.password_file is None:
            return self.password
        try:
            return self.password_file.read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ConfigError(f"password_file {self.password_file} cannot be read: {exc}") from None

    def server_key_bytes(self) -> bytes:
        if self.server_key.startswith("ed25519:"):
            return self.server_key.encode()
        try:
            return Path(self.server_key).read_bytes()
        except OSError as exc:
            raise ConfigError(f"server_key file {self.server_key} cannot be read: {exc.strerror}") from None


def _env_overrides(fields: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name in fields:
        value = os.environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            out[name] = value
    return out


def load_config(path: Path | None, **overrides: Any) -> AgentConfig:
    """Read ``path`` (TOML), apply ``EDGEHERD_AGENT_<FIELD>`` variables, then ``overrides``."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_toml(path, "config file", ConfigError)
        # relative file paths in the file are relative to the file, not to the working directory
        for name in ("password_file", "tls_ca", "tls_cert", "tls_key", "data_dir"):
            if isinstance(raw.get(name), str) and not Path(raw[name]).is_absolute():
                raw[name] = str(path.parent / raw[name])
        server_key = raw.get("server_key")
        if isinstance(server_key, str) and not server_key.startswith("ed25519:") and not Path(server_key).is_absolute():
            raw["server_key"] = str(path.parent / server_key)
    raw |= _env_overrides(AgentConfig.model_fields)
    raw |= {k: v for k, v in overrides.items() if v is not None}
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            key = ".".join(str(p) for p in err["loc"]) or "(config)"
            problems.append(f"{key}: {err['msg']}")
        where = f"{path}" if path else "agent config"
        raise ConfigError(f"{where}: " + "; ".join(problems)) from None
