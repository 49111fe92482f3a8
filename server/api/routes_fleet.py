"""Enrolling devices and rotating their credentials, and the feature registry (server/api/app.py).

Enrolling answers with the device's agent files (its broker credentials among them): they are secrets, shown once
over the pinned HTTPS connection, never logged, and the answer says ``Cache-Control: no-store``.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from pydantic import Field
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from protocol import MAX_LOG_LINES
from protocol.features import FeatureDefinition
from server import features
from server.api.auth import Operator, permit
from server.api.routes_base import DEVICE, NAME, Body, invalid, plain, refused
from server.broker import SERVER_USER
from server.db.models import Device, FeatureDefinitionRow
from server.governance import Permission
from server.groups import GROUP_PATTERN
from server.registry import RegistryError

__all__ = ["devices", "feature_registry"]

#: Largest agent file returned by ``POST /devices`` (they are a few KiB: a config, a key, certificates).
MAX_AGENT_FILE = 64 * 1024

devices = APIRouter(prefix="/devices", tags=["devices"])


class NewDevice(Body):
    id: Annotated[str, Field(pattern=DEVICE, description="a-z, 0-9 and '-', at most 63")]
    profile: Annotated[str, Field(min_length=1, max_length=64, description="A hardware profile's name (or any "
                                                                           "name, with custom_profile)")]
    groups: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=100)
    #: No hardware profile of that name: no latency budget, the general artifact order.
    custom_profile: bool = False


def _device_json(device: Device) -> dict[str, Any]:
    out: dict[str, Any] = plain(device.model_dump(mode="json"))
    return out


def _agent_files(directory: FilePath) -> dict[str, str]:
    """Every file of the device's enrolment directory, as text."""
    files: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.is_symlink() and path.stat().st_size <= MAX_AGENT_FILE:
            files[path.name] = path.read_text(encoding="utf-8")
    return files


@devices.post("", status_code=201, summary="Enrol a device; its agent files (secrets: its credentials) shown once")
def enrol_device(body: NewDevice, response: Response,
                 op: Annotated[Operator, Depends(permit(Permission.ENROLL_DEVICE))]) -> dict[str, Any]:
    from hardware.profiles import ProfileError, check_device_profile

    if body.id == SERVER_USER:
        raise invalid("id", f"{SERVER_USER} is the server's own broker user; name the device otherwise")
    try:
        check_device_profile(body.profile, custom=body.custom_profile)
    except ProfileError as exc:
        raise invalid("profile", str(exc)) from None
    try:
        enrolled = op.registry.add_device(body.id, body.profile, list(body.groups), actor=op.name,
                                          custom_profile=body.custom_profile)
    except RegistryError as exc:
        raise refused(exc) from None
    response.headers["Cache-Control"] = "no-store"
    return {"device": _device_json(enrolled.device), "files": _agent_files(enrolled.agent_config.parent),
            "secret": "files holds the device's broker credentials: copy them to the device (next to agent.toml, "
                      "mode 0600) and keep no other copy; they are not shown again"}


class DeviceSet(Body):
    groups: list[Annotated[str, Field(pattern=GROUP_PATTERN)]] | None = Field(
        default=None, max_length=100, description="Its groups, replacing the ones it has (absent: unchanged)")
    tags: list[Annotated[str, Field(pattern=GROUP_PATTERN)]] | None = Field(
        default=None, max_length=100, description="Its tags, replacing the ones it has (absent: unchanged)")


@devices.post("/{device_id}/set", summary="Replace a device's groups and/or tags; it converges to its groups' "
              "release (server/groups.py)")
def set_device(device_id: Annotated[str, Path(pattern=DEVICE)], body: DeviceSet,
               op: Annotated[Operator, Depends(permit(Permission.ENROLL_DEVICE))]) -> dict[str, Any]:
    _enrolled(op.registry, device_id)
    if body.groups is None and body.tags is None:
        raise invalid("", "give groups and/or tags")
    try:
        device = op.registry.set_device(device_id, groups=body.groups, tags=body.tags, actor=op.name)
    except RegistryError as exc:
        raise refused(exc) from None
    return {"device": _device_json(device)}


class Rotate(Body):
    timeout: Annotated[float, Field(ge=1, le=300, description="Seconds to wait for the agent to confirm")] = 30.0


@devices.post("/{device_id}/rotate-credentials",
              summary="New broker credentials over the device's own session; the old ones stop once it confirms")
def rotate_credentials(device_id: Annotated[str, Path(pattern=DEVICE)], body: Rotate,
                       op: Annotated[Operator, Depends(permit(Permission.ENROLL_DEVICE))]) -> dict[str, Any]:
    with Session(op.registry.engine) as db:
        device = db.get(Device, device_id)
        if device is None or device.revoked:
            raise HTTPException(404, f"no enrolled device named {device_id}")
    kind = "certificate" if op.registry.certificates else "password"
    try:
        done = op.registry.rotate_credentials(device_id, actor=op.name, timeout=body.timeout)
    except RegistryError as exc:
        raise refused(exc) from None
    return {"device": device_id, "credential": kind, "command_id": done.command_id, "message": done.message}


def _enrolled(registry: Any, device_id: str) -> None:
    with Session(registry.engine) as db:
        device = db.get(Device, device_id)
        if device is None or device.revoked:
            raise HTTPException(404, f"no enrolled device named {device_id}")


class DeviceCommand(Body):
    command: Literal["report-now", "set-log-level", "restart", "rollback"]
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = Field(
        None, description="The level, for set-log-level only")
    timeout: Annotated[float, Field(ge=1, le=300, description="Seconds to wait for the agent's answer")] = 30.0


@devices.post("/{device_id}/commands",
              summary="Send the device a command (report-now, set-log-level, restart, rollback) and wait for its "
                      "answer; audited")
def command_device(device_id: Annotated[str, Path(pattern=DEVICE)], body: DeviceCommand,
                   op: Annotated[Operator, Depends(permit(Permission.COMMAND_DEVICE))]) -> dict[str, Any]:
    from server.diagnostics import send_command

    _enrolled(op.registry, device_id)
    try:
        ack = send_command(op.registry, device_id, body.command, body.level, actor=op.name, timeout=body.timeout)
    except RegistryError as exc:
        raise refused(exc) from None
    return {"device": device_id, "command": body.command, "command_id": ack.command_id, "status": str(ack.status),
            "message": ack.message}


class LogRequest(Body):
    lines: Annotated[int, Field(ge=1, le=MAX_LOG_LINES, description="The newest lines to send")] = 100
    since: Annotated[int, Field(ge=0, le=2**53, description="Only lines numbered above it (a follow passes the "
                                                             "last answer's next_seq; such a poll is not audited)")] = 0
    timeout: Annotated[float, Field(ge=1, le=300, description="Seconds to wait for the agent's answer")] = 30.0


@devices.post("/{device_id}/logs",
              summary="The agent's newest log lines (untrusted text: escape control characters before showing it)")
def device_logs(device_id: Annotated[str, Path(pattern=DEVICE)], body: LogRequest,
                op: Annotated[Operator, Depends(permit(Permission.COMMAND_DEVICE))]) -> dict[str, Any]:
    from server.diagnostics import fetch_logs

    _enrolled(op.registry, device_id)
    try:
        batch = fetch_logs(op.registry, device_id, body.lines, body.since, actor=op.name, timeout=body.timeout,
                           audited=body.since == 0)
    except RegistryError as exc:
        raise refused(exc) from None
    return {"device": device_id, "lines": [line.model_dump(mode="json") for line in batch.lines],
            "truncated": batch.truncated, "next_seq": batch.next_seq}


# -- the feature registry ------------------------------------------------------------------------

feature_registry = APIRouter(prefix="/features", tags=["features"])


class FeatureFile(Body):
    """A feature-definitions file (``edgeherd features push``) as JSON: its ``[[feature]]`` tables."""

    feature: list[FeatureDefinition] = Field(min_length=1, max_length=256)


@feature_registry.post("", summary="Register feature definitions; a registered version is never changed")
def push_features(body: FeatureFile,
                  op: Annotated[Operator, Depends(permit(Permission.PUSH_MODEL))]) -> list[dict[str, str]]:
    with Session(op.registry.engine) as db:
        try:
            result, entry = features.register(db, list(body.feature), op.name)
            db.commit()
        except features.FeatureRegistryError as exc:
            raise refused(exc) from None
        except IntegrityError:
            raise HTTPException(409, "another push registered one of these feature versions at the same time; "
                                     "push again to see whether it agrees") from None
        if entry is not None:
            op.registry.anchor_audit(entry)
    return [{"feature": ref, "result": what} for ref, what in result]


def _definition_json(row: FeatureDefinitionRow, consumed_by: list[str]) -> dict[str, Any]:
    return {"feature": f"{row.name}@{row.version}", "name": row.name, "version": row.version, "sha256": row.sha256,
            "owner": row.owner, "pushed_by": row.pushed_by, "registered_at": plain(row.created_at),
            "definition": row.definition, "consumed_by": consumed_by}


def _definitions(op: Operator, name: str | None) -> list[dict[str, Any]]:
    with Session(op.registry.engine) as db:
        rows = features.definitions(db, name)
        used: dict[str, list[str]] = {}
        for c in features.consumers(db, name):
            used.setdefault(c.feature, []).append(c.model)
    return [_definition_json(r, used.get(f"{r.name}@{r.version}", [])) for r in rows]


@feature_registry.get("", summary="Every registered feature version and the model versions consuming it")
def list_features(op: Annotated[Operator, Depends(permit(Permission.READ))]) -> list[dict[str, Any]]:
    return _definitions(op, None)


def _known(op: Operator, name: str) -> None:
    with Session(op.registry.engine) as db:
        if db.exec(select(FeatureDefinitionRow.name).where(FeatureDefinitionRow.name == name)).first() is None:
            raise HTTPException(404, f"no feature named {name!r} is registered")


@feature_registry.get("/{name}", summary="Every version of one feature: its definition and its consumers")
def show_feature(name: Annotated[str, Path(pattern=NAME)],
                 op: Annotated[Operator, Depends(permit(Permission.READ))]) -> list[dict[str, Any]]:
    found = _definitions(op, name)
    if not found:
        raise HTTPException(404, f"no feature named {name!r} is registered")
    return found


@feature_registry.get("/{name}/drift", summary="One feature's drift per consuming model version and over all")
def feature_drift(name: Annotated[str, Path(pattern=NAME)],
                  op: Annotated[Operator, Depends(permit(Permission.READ))],
                  version: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
                  hours: Annotated[float, Query(ge=0, le=24 * 366, description="0: all statistics")] = 24.0
                  ) -> list[dict[str, Any]]:
    _known(op, name)
    since = datetime.now(timezone.utc) - timedelta(hours=hours) if hours > 0 else None
    with Session(op.registry.engine) as db:
        rows = features.drift(db, name, version, since)
    return [plain(r.to_dict()) for r in rows]
