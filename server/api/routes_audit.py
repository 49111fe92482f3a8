"""The audit log checked and exported (server/api/app.py): ``GET /audit/verify`` recomputes the hash chain (against
the data directory's anchor) and re-checks every approval's signature and its audit entry
(:func:`server.signatures.verify_approvals`), as ``edgeherd audit verify`` does; ``GET /audit/export`` streams
every entry, with its hashes, as JSON lines, so a copy kept elsewhere can be verified on its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from server import audit
from server.api.auth import Operator, permit
from server.db.models import AuditEntry
from server.governance import Permission
from server.signatures import verify_approvals

__all__ = ["audit_checks"]

audit_checks = APIRouter(prefix="/audit", tags=["drift and audit"])


@audit_checks.get("/verify", summary="Verify the hash chain and every approval's signature")
def verify(op: Annotated[Operator, Depends(permit(Permission.READ))]) -> dict[str, Any]:
    try:
        anchor = audit.read_anchor(op.registry.data / audit.ANCHOR_FILE)
    except audit.AuditError as exc:
        raise HTTPException(500, str(exc)) from None
    with Session(op.registry.engine) as db:
        chain = audit.verify(db, anchor=anchor)
        decisions = verify_approvals(db)
    return {"ok": chain.ok and decisions.ok,
            "chain": {"ok": chain.ok, "entries": chain.entries, "problems": list(chain.problems),
                      "anchor": {"seq": anchor.seq, "hash": anchor.hash} if anchor is not None else None},
            "approvals": {"ok": decisions.ok, "signed": decisions.signed, "unsigned": decisions.unsigned,
                          "problems": list(decisions.problems)}}


def _lines(engine: Engine, after: int) -> Iterator[bytes]:
    with Session(engine) as db:
        rows = db.exec(select(AuditEntry).where(col(AuditEntry.seq) > after).order_by(col(AuditEntry.seq))
                       .execution_options(yield_per=1000))
        for e in rows:
            at = e.at.replace(tzinfo=timezone.utc) if e.at.tzinfo is None else e.at.astimezone(timezone.utc)
            doc = {"seq": e.seq, "at": at.isoformat(timespec="microseconds"), "actor": e.actor,
                   "action": e.action, "subject": e.subject, "detail": e.detail, "prev_hash": e.prev_hash,
                   "hash": e.hash}
            yield (json.dumps(doc, sort_keys=True, ensure_ascii=False) + "\n").encode()


@audit_checks.get("/export", summary="Every audit entry (after seq `after`), oldest first, as JSON lines",
                  response_class=StreamingResponse,
                  responses={200: {"content": {"application/x-ndjson": {}},
                                   "description": "One entry a line: seq, at, actor, action, subject, detail, "
                                                  "prev_hash, hash"}})
def export(op: Annotated[Operator, Depends(permit(Permission.READ))],
           after: Annotated[int, Query(ge=0, description="Only entries with a greater seq")] = 0
           ) -> StreamingResponse:
    return StreamingResponse(_lines(op.registry.engine, after), media_type="application/x-ndjson",
                             headers={"Content-Disposition": 'attachment; filename="audit.ndjson"'})
