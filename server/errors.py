"""The root of the server's exceptions, so the CLI, the TUI and the API can catch one thing.

A leaf module: it imports nothing of the server, so any server module can derive from it without an
import cycle. Each module keeps its own exception (its name and messages are part of its interface)::

    ServerError
    ├── AgentReleaseError (server/agent_releases.py)
    ├── AlertError (server/alerts.py)
    │   └── AlertNotFound
    ├── ArchiveError (server/api/routes_upload.py)
    ├── AuditError (server/audit.py)
    ├── BackupError (server/backup.py; also a RuntimeError)
    ├── BrokerError (server/broker.py; also a RuntimeError)
    ├── BusError (server/bus.py)
    ├── DemoFailed (server/demo.py)
    ├── FeatureRegistryError (server/features.py)
    ├── GovernanceError (server/governance.py)
    ├── KeyRotationError (server/signing_keys.py)
    ├── PkiError (server/pki.py)
    ├── RegistryError (here, for server/registry.py and server/desired.py; re-exported by server/registry.py)
    ├── RetentionError (server/retention.py; also a ValueError)
    ├── RolloutError (server/orchestrator.py)
    ├── SettingError (server/settings.py; also a ValueError)
    ├── SignatureCheckError (server/signatures.py)
    ├── SimulationError (server/simulate.py)
    ├── StoreError (server/distribution.py)
    └── TokenError (server/api/tokens.py)

The operator API's client (server/api/client.py: ApiError, LoginError) is the other side of the wire and keeps
its own.
"""

from __future__ import annotations

__all__ = ["RegistryError", "ServerError"]


class ServerError(Exception):
    """An operation of the server cannot be done; the message says why and, where it can, what to do."""


class RegistryError(ServerError):
    """An operation cannot be done; the message says why and what to do."""
