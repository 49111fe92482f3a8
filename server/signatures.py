"""Approvals that can be proven: an approver signs their decision with their own Ed25519 key.

What is signed is :func:`decision_payload`, the canonical JSON of::

    {"kind": "edgeherd.decision.v1", "manifest_sha256": ..., "model": "NAME:VERSION",
     "decision": "approve" | "reject", "operator": ..., "reason": ...}

so a signature binds who decided what about exactly which manifest, and why. The client signs it
(``edgeherd model approve`` with the key from ``edgeherd operator keygen``), the server checks it against the
public key registered for the operator before it records the decision, stores the signature and the key in the
approval row and in the decision's audit entry, and ``edgeherd audit verify`` (and ``GET /api/v1/audit/verify``)
re-checks every row offline (:func:`verify_approvals`, :func:`check_approvals`): an approval row edited in the
database no longer verifies, one whose signature was removed no longer matches its hash-chained audit entry, and
a row deleted leaves that entry unclaimed.

Public keys are the one-line text form ``ed25519:<base64 of the 32 raw bytes>`` (protocol/signing.py);
signatures are base64 of the 64 bytes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import Session, col, select

from protocol.canonical import canonical_json
from protocol.errors import KeyFormatError
from protocol.signing import load_public_key
from server.db.models import Approval, AuditEntry, ModelVersion
from server.errors import ServerError

__all__ = ["DECISION_KIND", "KEY_REPLACEMENT_KIND", "ApprovalReport", "SignatureCheckError", "check_approvals",
           "decision_payload", "key_replacement_payload", "sign_decision", "sign_key_replacement", "verify_approvals",
           "verify_decision", "verify_key_replacement"]

DECISION_KIND = "edgeherd.decision.v1"


class SignatureCheckError(ServerError):
    """A decision's signature is missing, malformed or does not verify; the message says which."""


def decision_payload(*, manifest_sha256: str, model: str, decision: str, operator: str, reason: str) -> bytes:
    """The bytes an approver signs: canonical JSON, so client and server build the same bytes."""
    return canonical_json({"kind": DECISION_KIND, "manifest_sha256": manifest_sha256, "model": model,
                           "decision": decision, "operator": operator, "reason": reason})


def sign_decision(key: Ed25519PrivateKey, **fields: str) -> str:
    """base64 of the Ed25519 signature of :func:`decision_payload` (keyword arguments as there)."""
    return base64.b64encode(key.sign(decision_payload(**fields))).decode()


def verify_decision(public_key: str, signature: str, **fields: str) -> None:
    """:class:`SignatureCheckError` unless ``signature`` (base64) by ``public_key`` (``ed25519:…``) signs
    :func:`decision_payload` of ``fields``."""
    try:
        pub = load_public_key(public_key)
    except KeyFormatError as exc:
        raise SignatureCheckError(f"public key: {exc}") from None
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureCheckError("signature: not base64") from None
    if len(raw) != 64:
        raise SignatureCheckError(f"signature: {len(raw)} bytes, an Ed25519 signature has 64")
    try:
        pub.verify(raw, decision_payload(**fields))
    except InvalidSignature:
        raise SignatureCheckError("the signature does not verify with the operator's key over this decision "
                                  "(manifest digest, model, decision, operator and reason)") from None


Recorded = tuple[str, str, dict[str, object]]


KEY_REPLACEMENT_KIND = "edgeherd.key-replacement.v1"


def key_replacement_payload(new_public_key: str) -> bytes:
    """What an operator's current key signs to let a new key replace it: whoever holds only their token cannot
    swap in a key of their own and then sign approvals in their name."""
    return canonical_json({"kind": KEY_REPLACEMENT_KIND, "public_key": new_public_key})


def sign_key_replacement(current: Ed25519PrivateKey, new_public_key: str) -> str:
    return base64.b64encode(current.sign(key_replacement_payload(new_public_key))).decode()


def verify_key_replacement(current_public_key: str, signature: str, new_public_key: str) -> None:
    """:class:`SignatureCheckError` unless ``signature`` by the current key approves ``new_public_key``."""
    try:
        pub = load_public_key(current_public_key)
        raw = base64.b64decode(signature, validate=True)
        pub.verify(raw, key_replacement_payload(new_public_key))
    except (KeyFormatError, binascii.Error, ValueError, InvalidSignature):
        raise SignatureCheckError("the replacement is not signed by the operator's current key") from None


def check_approvals(rows: Iterable[tuple[int, str, str, str, str, str, str | None, str | None, Recorded | None]]
                    ) -> tuple[int, int, list[str]]:
    """Re-check decisions offline. Each row is (approval id, manifest digest, model, decision, operator, reason,
    signature, public key, and the (actor, action, detail) of the audit entry that recorded it, or None for a
    row older than that link).

    Returns (signed rows that verify, unsigned rows, problems). A problem is a signature that does not verify,
    or a row that disagrees with its audit entry (which the hash chain protects): an edited decision, reason or
    operator, or a signature added or removed after the fact."""
    good = unsigned = 0
    problems: list[str] = []
    for row_id, digest, model, decision, operator, reason, signature, public_key, entry in rows:
        where = f"approval #{row_id} ({operator} {decision} {model})"
        if entry is not None:
            actor, action, detail = entry
            recorded = (actor, action, detail.get("manifest_sha256"), detail.get("reason"), detail.get("signature"),
                        detail.get("public_key"))
            if recorded != (operator, f"model.{decision}", digest, reason, signature, public_key):
                problems.append(f"{where}: differs from the audit entry that recorded it (operator, decision, "
                                f"reason, signature or key edited)")
                continue
        if signature is None or public_key is None:
            unsigned += 1
            continue
        try:
            verify_decision(public_key, signature, manifest_sha256=digest, model=model, decision=decision,
                            operator=operator, reason=reason)
        except SignatureCheckError as exc:
            problems.append(f"{where}: {exc}")
            continue
        good += 1
    return good, unsigned, problems


@dataclass(frozen=True)
class ApprovalReport:
    """What :func:`verify_approvals` found: signed decisions that verify, unsigned ones, and problems."""

    signed: int
    unsigned: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


DECISION_ACTIONS = ("model.approve", "model.reject")


def verify_approvals(db: Session) -> ApprovalReport:
    """Re-check every recorded decision against its audit entry and its signature (:func:`check_approvals`).

    Each ``approvals`` row is paired with the audit entry that recorded it: through ``audit_seq``, or, for a row
    older than that link, with an unclaimed entry of the same operator, decision, version and reason. Beyond what
    :func:`check_approvals` finds, a problem is a row pointing at an entry that is not a decision, a signed row
    with its link removed, a row no entry records (written into the database directly), a row whose version is
    gone, and a decision entry no row claims (its row deleted)."""
    versions = {v.id: v for v in db.exec(select(ModelVersion))}
    decisions = {e.seq: e for e in db.exec(select(AuditEntry).where(col(AuditEntry.action).in_(DECISION_ACTIONS)))}
    problems: list[str] = []
    claimed: set[int] = set()
    checkable = []
    rows = list(db.exec(select(Approval).order_by(col(Approval.id))))
    for row in sorted(rows, key=lambda r: r.audit_seq is None):  # linked rows claim their entries first
        where = f"approval #{row.id} ({row.actor} {row.decision})"
        version = versions.get(row.version_id)
        if version is None:
            problems.append(f"{where}: its model version (id {row.version_id}) is not in the registry")
            continue
        model = f"{version.name}:{version.version}"
        where = f"approval #{row.id} ({row.actor} {row.decision} {model})"
        if row.audit_seq is not None:
            entry = decisions.get(row.audit_seq)
            if entry is None:
                problems.append(f"{where}: audit entry #{row.audit_seq}, which it names, does not record a decision")
                continue
        elif row.signature is not None or row.public_key is not None:
            problems.append(f"{where}: signed, but its link to the audit entry that recorded it was removed")
            continue
        else:  # older than the link: the unclaimed entry that says the same
            entry = next((e for seq, e in sorted(decisions.items()) if seq not in claimed and e.actor == row.actor
                          and e.action == f"model.{row.decision}" and e.subject == f"model:{model}"
                          and e.detail.get("reason") == row.reason), None)
            if entry is None:
                problems.append(f"{where}: no audit entry records this decision (the row was added or edited in "
                                f"the database)")
                continue
        claimed.add(entry.seq)
        checkable.append((row.id or 0, version.manifest_sha256, model, row.decision, row.actor, row.reason,
                          row.signature, row.public_key, (entry.actor, entry.action, dict(entry.detail))))
    good, unsigned, found = check_approvals(checkable)
    problems += found
    problems += [f"audit entry #{seq} ({e.actor} {e.action.removeprefix('model.')} {e.subject.removeprefix('model:')})"
                 f": no approval row records it (the row was deleted, or its link to the entry removed)"
                 for seq, e in sorted(decisions.items()) if seq not in claimed]
    return ApprovalReport(good, unsigned, problems)
