"""What the TUI shows and does, read from and done through the operator API (server/api/) instead of the database:
for an operator who has logged in (``edgeherd login``) from their own machine.

:class:`RemoteFleetData` has the interface of :class:`server.tui.data.FleetData` (the screens cannot tell them
apart): every read is one or a few GETs whose JSON is validated back into the same dataclasses, every action the
POST the CLI makes, acting as the token's operator. The server checks every permission again; :meth:`may` only
greys out in advance what the role (from ``GET /whoami``) and the token's scope would refuse.

Errors: every failure is :class:`~server.tui.data.ActionError` with a message for the operator: the server's
refusal (``ApiError``), an answer that does not have the shape the screens need, or a missing signing key.

Every method but :meth:`may`, :meth:`role` and :attr:`actor` makes requests; the app calls them from worker
threads only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from server import audit
from server.api.auth import PUSH_SCOPE
from server.api.client import ApiClient, ApiError, key_path
from server.api.routes_base import DEVICE, NAME, REF
from server.db.models import AuditEntry
from server.drift import FeatureDrift
from server.features import FeatureDriftRow
from server.governance import Permission, Role, allowed, four_eyes_refusal
from server.rollouts import RolloutCommand, RolloutSpec
from server.tui.data import (
    ActionError,
    AlertRow,
    DeviceDetail,
    DeviceRow,
    DriftRow,
    FleetPage,
    FleetQuery,
    ModelRow,
    RolloutDetail,
    RolloutRow,
)

__all__ = ["RemoteFleetData"]

T = TypeVar("T")

#: Longest audit filter the API takes (``GET /audit?text=``).
MAX_AUDIT_TEXT = 200
#: Longest Fleet filter and largest page the API takes (``GET /devices?filter=…&limit=…``).
MAX_FLEET_FILTER = 200
MAX_FLEET_PAGE = 1000
_DEVICES = TypeAdapter(list[DeviceRow])
_DEVICE = TypeAdapter(DeviceDetail)
_FLEET_PAGE = TypeAdapter(FleetPage)
_ROLLOUTS = TypeAdapter(list[RolloutRow])
_ROLLOUT = TypeAdapter(RolloutDetail)
_MODELS = TypeAdapter(list[ModelRow])
_DRIFT = TypeAdapter(list[DriftRow])


@dataclass(frozen=True)
class _AuditLine:
    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class _Verified:
    ok: bool
    entries: int
    problems: list[str]


@dataclass(frozen=True)
class _AuditAnswer:
    entries: list[_AuditLine]
    verified: _Verified


@dataclass(frozen=True)
class _Identity:
    operator: str
    role: Role
    scope: str
    public_key: str | None


@dataclass(frozen=True)
class _Version:
    """The parts of ``GET /models/{ref}`` the TUI uses."""

    name: str
    version: str
    manifest_sha256: str
    stage: str
    author: str | None
    card: str
    history: list[dict[str, Any]]

    def refusal(self, actor: str, ref: str) -> str | None:
        """Why ``actor`` may not approve it (server/governance.py :func:`four_eyes_refusal`), with who pushed and
        who last promoted it as far as the history the server returns shows them (newest first)."""

        def last(action: str) -> str | None:
            return next((str(h.get("actor")) for h in self.history if h.get("action") == action), None)

        return four_eyes_refusal(actor, ref, author=self.author, pushed_by=last("model.push"),
                                 promoted_by=last("model.promote"))


_AUDIT = TypeAdapter(_AuditAnswer)
_IDENTITY = TypeAdapter(_Identity)
_VERSION = TypeAdapter(_Version)
_FEATURE_DRIFT = TypeAdapter(list[dict[str, Any]])
_FEATURE = TypeAdapter(FeatureDrift)
_FLOAT_FIELDS = ("psi", "psi_threshold", "js", "chi2", "p_value", "nan_rate")


def _decode(adapter: TypeAdapter[T], answer: Any, what: str) -> T:
    """``answer`` validated into the adapter's type, or ActionError naming the first field that does not fit."""
    try:
        return adapter.validate_python(answer)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ActionError(f"the server's answer for {what} does not have the expected shape ({where}: "
                          f"{first['msg']}); is it another edgeherd version?") from None


def _segment(value: str, pattern: str, what: str) -> str:
    """``value`` as one path segment of a request, checked against the API's pattern for it."""
    if not re.fullmatch(pattern, value):
        raise ActionError(f"{value!r} is not a valid {what}")
    return value


def _nan(value: Any) -> Any:
    """The API sends a float that is not finite as null (server/api/routes_base.py); a score shown is NaN then."""
    return float("nan") if value is None else value


class RemoteFleetData:
    """The TUI's data through the operator API, as the operator whose token ``client`` carries."""

    def __init__(self, client: ApiClient) -> None:
        """Asks ``GET /whoami`` once (ActionError when the server cannot be reached or refuses the token): who
        acts, and with which role, is known before the first screen is drawn."""
        self.client = client
        self._me = self._whoami()
        self.actor = self._me.operator
        #: (ref, stage, decisions) → whether this operator may approve it; fixed while the three stay the same.
        self._four_eyes: dict[tuple[str, str, str], bool] = {}
        self._models: dict[str, ModelRow] = {}

    # -- requests ---------------------------------------------------------------------------------

    def _get(self, path: str, **query: Any) -> Any:
        try:
            return self.client.get(path, **query)
        except ApiError as exc:
            raise ActionError(str(exc)) from None

    def _post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            return self.client.post(path, body)
        except ApiError as exc:
            raise ActionError(str(exc)) from None

    def _whoami(self) -> _Identity:
        return _decode(_IDENTITY, self._get("/whoami"), "/whoami")

    def _version(self, ref: str) -> _Version:
        ref = _segment(ref, REF, "model version (NAME:VERSION)")
        return _decode(_VERSION, self._get(f"/models/{ref}"), f"model {ref}")

    # -- who may do what ------------------------------------------------------------------------

    def may(self, permission: Permission) -> bool:
        """Whether the role (as of ``GET /whoami`` when the TUI started) and the token's scope allow it."""
        if self._me.scope != "full" and permission not in PUSH_SCOPE:
            return False
        return allowed(self._me.role, permission)

    def role(self) -> str:
        return self._me.role.value

    # -- reads ----------------------------------------------------------------------------------

    def devices(self, only: str | None = None) -> list[DeviceRow]:
        """Every device's row (or only device ``only``'s)."""
        if only is not None:
            return [self.device(only).row]
        return _decode(_DEVICES, self._get("/devices"), "/devices")

    def fleet(self, query: FleetQuery) -> FleetPage:
        """One page of the Fleet table, cut by the server (``GET /devices?limit=…``, at most
        :data:`MAX_FLEET_PAGE` rows, whatever ``query.limit`` says); a server without paging answers every device,
        and the page is cut here (server/tui/fleet_page.py)."""
        params: dict[str, Any] = {"filter": query.text[:MAX_FLEET_FILTER], "sort": query.sort,
                                  "reverse": "true" if query.reverse else "false", "offset": query.offset,
                                  "limit": MAX_FLEET_PAGE if query.limit is None else min(query.limit, MAX_FLEET_PAGE)}
        if query.focus is not None and re.fullmatch(DEVICE, query.focus):
            params["focus"] = query.focus
        answer = self._get("/devices", **params)
        if isinstance(answer, list):
            from server.tui.fleet_page import page_of

            every: list[DeviceRow] = _decode(_DEVICES, answer, "/devices")
            return page_of(every, query)
        return _decode(_FLEET_PAGE, answer, "/devices")

    def device(self, device_id: str) -> DeviceDetail:
        device_id = _segment(device_id, DEVICE, "device id")
        return _decode(_DEVICE, self._get(f"/devices/{device_id}"), f"device {device_id}")

    def rollouts(self) -> list[RolloutRow]:
        return _decode(_ROLLOUTS, self._get("/rollouts"), "/rollouts")

    def alerts(self, include_all: bool = False) -> list[AlertRow]:
        answer = self._get("/alerts", all="true" if include_all else "false")
        try:
            return [AlertRow.of(a) for a in answer]
        except (KeyError, TypeError, ValueError) as exc:
            raise ActionError(f"the server's answer for /alerts does not have the expected shape ({exc}); is it "
                              f"another edgeherd version?") from None

    def acknowledge(self, alert_id: int, note: str | None = None) -> None:
        self._post(f"/alerts/{int(alert_id)}/ack", {"note": note})

    def rollout(self, name: str) -> RolloutDetail:
        name = _segment(name, NAME, "rollout name")
        return _decode(_ROLLOUT, self._get(f"/rollouts/{name}"), f"rollout {name}")

    def models(self) -> list[ModelRow]:
        rows = _decode(_MODELS, self._get("/models"), "/models")
        self._models = {r.ref: r for r in rows}
        return rows

    def card(self, ref: str) -> str:
        """The version's model card (Markdown), with its lifecycle, approvals and where it runs."""
        return self._version(ref).card

    def drift(self, hours: float = 24.0) -> list[DriftRow]:
        """Fleet-wide drift per version and feature over the last ``hours``, worst first."""
        answer = self._get("/drift", hours=hours)
        if isinstance(answer, list):
            answer = [{**r, "score": _nan(r.get("score"))} if isinstance(r, dict) else r for r in answer]
        return _decode(_DRIFT, answer, "/drift")

    def feature_drift(self, feature: str, hours: float = 24.0) -> list[FeatureDriftRow]:
        """A registry feature's drift per model version consuming it and over all of them
        (``GET /features/{name}/drift``); empty for a feature that is not a registry feature (404)."""
        if not re.fullmatch(NAME, feature):
            return []
        try:
            answer = self.client.get(f"/features/{feature}/drift", hours=hours)
        except ApiError as exc:
            if exc.status == 404:
                return []
            raise ActionError(str(exc)) from None
        out = []
        for r in _decode(_FEATURE_DRIFT, answer, f"feature {feature}'s drift"):
            fields = {k: _nan(r.get(k)) if k in _FLOAT_FIELDS else r.get(k) for k in FeatureDrift.__dataclass_fields__}
            out.append(FeatureDriftRow(str(r.get("feature", "")), str(r.get("model", "")), int(r.get("windows") or 0),
                                       _decode(_FEATURE, fields, f"feature {feature}'s drift")))
        return out

    def drift_series(self, version: str, feature: str, points: int = 60) -> list[float]:
        """The fleet's drift of one feature of one version over time: the API has no read for it yet
        (``GET /drift`` gives the latest evaluations only), so always empty; the Drift screen then says there
        is no fleet-wide evaluation to plot."""
        return []

    def audit_log(self, text: str = "", limit: int = 500) -> tuple[list[AuditEntry], audit.AuditReport]:
        """The newest ``limit`` entries matching ``text`` (the server filters), and the chain's verification as
        the server found it. The entries carry no hashes (``GET /audit`` leaves them out)."""
        answer = _decode(_AUDIT, self._get("/audit", text=text[:MAX_AUDIT_TEXT], limit=limit), "/audit")
        entries = [AuditEntry(seq=e.seq, at=e.at, actor=e.actor, action=e.action, subject=e.subject,
                              detail=e.detail, prev_hash="", hash="") for e in answer.entries]
        v = answer.verified
        return entries, audit.AuditReport(v.ok, v.entries, list(v.problems))

    # -- actions --------------------------------------------------------------------------------

    def start_rollout(self, *, name: str, model: str, target: dict[str, list[str]], spec: RolloutSpec) -> None:
        self._post("/rollouts", {"name": name, "model": model, "target": target,
                                 "spec": spec.model_dump(mode="json")})

    def command(self, name: str, command: str, reason: str | None = None) -> None:
        try:
            cmd = RolloutCommand(command)
        except ValueError:
            raise ActionError(f"{command!r} is not a rollout command "
                              f"({', '.join(c.value for c in RolloutCommand)})") from None
        name = _segment(name, NAME, "rollout name")
        self._post(f"/rollouts/{name}/{cmd.value}", {"reason": reason})

    def decide(self, ref: str, decision: str, reason: str) -> None:
        """Approve or reject a candidate version, signed with the operator's key (``edgeherd operator keygen``)."""
        from protocol.errors import KeyFormatError
        from protocol.signing import load_private_key, public_key_to_text
        from server.signatures import sign_decision

        if decision not in ("approve", "reject"):
            raise ActionError(f"{decision!r}: a decision is approve or reject")
        path = key_path()
        try:
            key = load_private_key(path.read_bytes())
        except FileNotFoundError:
            raise ActionError(f"no signing key at {path}: decisions are signed; run `edgeherd operator keygen` "
                              f"(it writes the key and registers its public half with the server)") from None
        except (OSError, KeyFormatError) as exc:
            raise ActionError(f"cannot use the signing key {path}: {exc}; `edgeherd operator keygen --force` "
                              f"makes a new one") from None
        me = self._whoami()  # now, not at start: the key may have been registered since
        if me.public_key is None:
            raise ActionError(f"{me.operator} has no signing key registered with the server; run `edgeherd "
                              f"operator keygen --force` to register the key at {path}")
        if public_key_to_text(key.public_key()) != me.public_key:
            raise ActionError(f"the signing key at {path} is not the one registered for {me.operator}; run "
                              f"`edgeherd operator keygen --force` to register a new one")
        version = self._version(ref)
        reason = reason.strip()
        signature = sign_decision(key, manifest_sha256=version.manifest_sha256,
                                  model=f"{version.name}:{version.version}", decision=decision,
                                  operator=me.operator, reason=reason)
        self._post(f"/models/{ref}/{decision}", {"reason": reason, "signature": signature})

    def can_decide(self, ref: str) -> bool:
        """Whether this operator may approve ``ref`` now: the role allows it, it is a candidate, and they neither
        wrote, pushed nor promoted it (the server checks again when they do)."""
        if not self.may(Permission.APPROVE):
            return False
        row = self._models.get(ref)
        if row is not None and row.stage != "candidate":
            return False
        key = (ref, row.stage, row.approvals) if row is not None else None
        may = self._four_eyes.get(key) if key is not None else None
        if may is None:
            try:
                version = self._version(ref)
            except ActionError:
                return False
            if version.stage != "candidate":
                return False
            may = version.refusal(self.actor, ref) is None
            if key is not None:
                self._four_eyes[key] = may
        return may

    def deploy(self, device_id: str, ref: str) -> str:
        """Deploy ``ref`` to the device; what happened, in a sentence."""
        ref = _segment(ref, REF, "model version (NAME:VERSION)")
        answer = self._post(f"/models/{ref}/deploy", {"device": _segment(device_id, DEVICE, "device id")})
        said = answer.get("result") if isinstance(answer, dict) else None
        return str(said) if said else f"{device_id} should now run {ref}"

    def revoke(self, device_id: str) -> None:
        self._post(f"/devices/{_segment(device_id, DEVICE, 'device id')}/revoke")

    def set_device(self, device_id: str, groups: list[str], tags: list[str]) -> str:
        path = f"/devices/{_segment(device_id, DEVICE, 'device id')}/set"
        answer = self._post(path, {"groups": groups, "tags": tags})
        device = answer.get("device") if isinstance(answer, dict) else None
        if not isinstance(device, dict):
            raise ActionError("the server's answer holds no device; is it another edgeherd version?")
        return f"{device_id}: groups {', '.join(map(str, device.get('groups') or [])) or '(none)'}; " \
               f"tags {', '.join(map(str, device.get('tags') or [])) or '(none)'}"

    def device_command(self, device_id: str, command: str, level: str | None = None) -> str:
        from server.diagnostics import clean

        path = f"/devices/{_segment(device_id, DEVICE, 'device id')}/commands"
        answer = self._post(path, {"command": command, **({"level": level.upper()} if level else {})})
        status, message = str(answer.get("status")), clean(str(answer.get("message", "")))
        if status != "done":
            raise ActionError(f"{device_id} answered {status}: {message or 'no reason given'}")
        return f"{device_id}: {command} done: {message}"

    def device_logs(self, device_id: str, lines: int = 200) -> list[str]:
        from server.diagnostics import decode_lines, format_line
        from server.registry import RegistryError

        answer = self._post(f"/devices/{_segment(device_id, DEVICE, 'device id')}/logs", {"lines": lines})
        try:
            batch = decode_lines(answer.get("lines") if isinstance(answer, dict) else None)
        except RegistryError as exc:
            raise ActionError(str(exc)) from None
        return [format_line(line) for line in batch]
