"""The operator API refuses what it must, on a real ``edgeherd server run`` over HTTPS: bad tokens, throttling,
roles and scopes on every mutating route, four-eyes, signatures that do not verify, hostile bundle archives, and
approvals edited in the database (``edgeherd audit verify`` names them).

One server for the module (its bundles capped at 1 MiB); the throttling test has one of its own, since throttling
shuts its address out for a minute.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from protocol.signing import generate_signing_key, public_key_to_text
from server.api.app import create_app
from server.api.client import ApiClient
from server.api.tokens import issue
from server.db import make_engine
from server.governance import Permission, Role
from server.registry import Registry
from tests.api_helpers import ApiServer, api_server
from tests.server_helpers import blob_bundle
from tests.test_api import pack, push, raw, register_key, signed, status_of, upload

pytestmark = pytest.mark.integration

CAP = 1 << 20


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    tmp = tmp_path_factory.mktemp("api-security")
    os.chmod(tmp, 0o701)  # the managed broker (user mosquitto) reaches the data directory inside
    before = os.environ.get("EDGEHERD_API_MAX_BUNDLE")
    os.environ["EDGEHERD_API_MAX_BUNDLE"] = str(CAP)  # read by the server process when it starts
    try:
        with api_server(tmp, {"otto": Role.OPERATOR, "bob": Role.APPROVER, "carol": Role.APPROVER,
                              "vic": Role.VIEWER}) as server:
            yield server
    finally:
        if before is None:
            os.environ.pop("EDGEHERD_API_MAX_BUNDLE", None)
        else:
            os.environ["EDGEHERD_API_MAX_BUNDLE"] = before


def _sql(srv: ApiServer, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(srv.data / "edgeherd.db", timeout=30) as conn:
        return conn.execute(statement, args).fetchall()


# -- tokens ------------------------------------------------------------------------------------


def test_wrong_malformed_expired_and_revoked_tokens_get_401(srv):
    engine = make_engine(f"sqlite:///{srv.data / 'edgeherd.db'}")
    try:
        with Session(engine) as db:
            expired, row = issue(db, "otto", created_by="admin", ttl=timedelta(minutes=1))
            expired_id = row.id
    finally:
        engine.dispose()
    _sql(srv, "UPDATE operator_tokens SET expires_at = '2020-01-01 00:00:00' WHERE id = ?", expired_id)
    revoked = srv.client("otto").request("POST", "/operators/tokens", {"label": "soon gone"})
    srv.client("otto").request("DELETE", f"/operators/tokens/{revoked['token_info']['id']}")
    known = srv.tokens["otto"]
    wrong = known[:-4] + ("AAAA" if not known.endswith("AAAA") else "BBBB")  # well-formed, right id, wrong secret
    for token, reason in ((None, "no token"), ("hunter2", "malformed token"), (wrong, "unknown token"),
                          (expired, f"token {expired_id} expired at 2020-01-01 00:00 UTC"),
                          (revoked["token"], f"token {revoked['token_info']['id']} was revoked")):
        code, headers, body = raw(srv, "GET", "/whoami", token)
        assert code == 401 and json.loads(body)["detail"].startswith(reason), (token, body)
        assert headers["www-authenticate"] == "Bearer"
    assert raw(srv, "GET", "/health", None)[0] == 200  # the one route without a token
    assert srv.client("otto").get("/whoami")["operator"] == "otto"  # five failures: not yet throttled


def test_ten_failures_from_one_address_get_429_and_an_audit_entry(tmp_path):
    with api_server(tmp_path) as server:
        for _ in range(10):
            assert raw(server, "GET", "/whoami", "eh_000000000000_" + "A" * 43)[0] == 401
        code, headers, body = raw(server, "GET", "/whoami", server.tokens["admin"])  # even a good token, for now
        assert code == 429 and "too many failed authentications from 127.0.0.1" in json.loads(body)["detail"]
        assert int(headers["retry-after"]) > 0
        with sqlite3.connect(server.data / "edgeherd.db") as conn:
            rows = conn.execute("SELECT actor, subject, detail FROM audit_log WHERE action = 'api.auth_throttled'"
                                ).fetchall()
        assert [(actor, subject) for actor, subject, _ in rows] == [("system", "address:127.0.0.1")]
        assert json.loads(rows[0][2])["last_error"] == "unknown token"


# -- roles and scopes ------------------------------------------------------------------------------


def _mutating_routes() -> list[tuple[str, str, Permission | None]]:
    """(method, path, permission) of every route other than GET, from the app itself."""
    from fastapi.routing import APIRoute

    from server.api.docs import _permission_of

    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp))
        try:
            app = create_app(registry, max_bundle=CAP)
        finally:
            registry.engine.dispose()
    found = []
    for route in app.routes:
        inner = ([("", route)] if isinstance(route, APIRoute)
                 else [(route.include_context.prefix, r) for r in route.original_router.routes]  # type: ignore[attr-defined]
                 if hasattr(route, "original_router") else [])
        for prefix, r in inner:
            if isinstance(r, APIRoute):
                found += [(m, prefix + r.path_format, _permission_of(r)) for m in sorted(r.methods)
                          if m not in ("GET", "HEAD")]
    return found


#: Mutating routes any operator, a viewer too, may call: their own key and tokens.
SELF_SERVICE = {("PUT", "/api/v1/operators/me/key"), ("POST", "/api/v1/operators/tokens"),
                ("DELETE", "/api/v1/operators/tokens/{token_id}")}
PATH_VALUES = {"device_id": "pi-1", "ref": "blob:1.0.0", "name": "r1", "token_id": "tok_000000000000", "alert_id": "1"}


def test_a_viewer_gets_403_on_every_mutating_route(srv):
    routes = _mutating_routes()
    assert len(routes) >= 19 and ("POST", "/api/v1/models/upload", Permission.PUSH_MODEL) in routes
    assert {(m, p) for m, p, perm in routes if perm is Permission.READ} == SELF_SERVICE
    checked = 0
    for method, path, permission in routes:
        if permission is Permission.READ:
            continue
        assert permission is not None, f"{method} {path} checks no permission"
        concrete = path.removeprefix("/api/v1").format(**PATH_VALUES)
        code, _, body = raw(srv, method, concrete, srv.tokens["vic"], b"{}", {"Content-Type": "application/json"})
        assert code == 403, (method, path, code, body)
        assert "vic is a viewer" in json.loads(body)["detail"], body
        checked += 1
    assert checked == len(routes) - len(SELF_SERVICE)


def test_a_push_token_uploads_and_reads_but_cannot_promote_approve_or_roll_out(srv, tmp_path):
    made = srv.client("bob").request("POST", "/operators/tokens", {"scope": "push", "label": "ci"})
    ci = ApiClient(srv.url, srv.ca_pem, made["token"])
    bundle, _, digest = blob_bundle(tmp_path / "ci", srv.key, model="ci-pushed", size=4096, author="alice")
    assert upload(ci, pack(bundle, tmp_path / "ci.tar"))["manifest_sha256"] == digest
    assert ci.get("/models/ci-pushed:1.0.0")["stage"] == "draft"
    assert ci.post("/features", {"feature": [{"name": "ci_only", "version": 1, "min": 0.0, "max": 1.0,
                                              "transform": {"op": "clip", "column": "x", "min": 0.0, "max": 1.0}}]})
    for path, body in (("/models/ci-pushed:1.0.0/promote", {}),
                       ("/models/ci-pushed:1.0.0/approve", {"reason": "x", "signature": "AAAA"}),
                       ("/rollouts", {"name": "ci-r", "model": "ci-pushed:1.0.0", "target": {"groups": ["a"]}})):
        code, message = status_of(lambda path=path, body=body: ci.post(path, body))
        assert code == 403 and "scoped to pushing" in message, (path, message)
    # nor manage its operator's tokens and key: a leaked CI token must not outlive its revocation or sign as bob
    for method, path, body in (("POST", "/operators/tokens", {"scope": "full"}),
                               ("POST", "/operators/tokens", {"scope": "push"}),
                               ("PUT", "/operators/me/key", {"public_key": public_key_to_text(
                                   generate_signing_key().public_key())}),
                               ("DELETE", f"/operators/tokens/{made['token_info']['id'][:-1]}0", None)):
        code, message = status_of(lambda m=method, p=path, b=body: ci.request(m, p, b))
        assert code == 403 and "scoped to pushing" in message, (path, message)
    assert srv.client("otto").get("/models/ci-pushed:1.0.0")["stage"] == "draft"
    assert ci.request("DELETE", f"/operators/tokens/{made['token_info']['id']}")["revoked_at"]  # itself: yes


def test_replacing_a_signing_key_needs_the_old_keys_signature_or_an_admin(srv):
    from server.signatures import sign_key_replacement

    carol = srv.client("carol")
    first = register_key(carol)
    intruder = generate_signing_key()  # someone with carol's token but not her key
    text = public_key_to_text(intruder.public_key())
    code, message = status_of(lambda: carol.request("PUT", "/operators/me/key", {"public_key": text}))
    assert code == 403 and "replacing it needs a signature by it" in message
    code, message = status_of(lambda: carol.request("PUT", "/operators/me/key", {
        "public_key": text, "previous_signature": sign_key_replacement(intruder, text)}))
    assert code == 422 and "previous_signature" in message
    assert carol.get("/whoami")["public_key"] == public_key_to_text(first.public_key())
    code, _ = status_of(lambda: srv.client("vic").request("PUT", "/operators/carol/key", {"public_key": text}))
    assert code == 403
    assert srv.client("admin").request("PUT", "/operators/carol/key", {"public_key": text})["operator"] == "carol"
    assert carol.get("/whoami")["public_key"] == text
    assert srv.client("admin").request("PUT", "/operators/carol/key", {"public_key": public_key_to_text(
        first.public_key())})["public_key"] == public_key_to_text(first.public_key())  # back, for later tests


# -- four-eyes and signatures ----------------------------------------------------------------------


def test_an_approver_cannot_approve_what_they_pushed_or_promoted_even_with_another_token(srv, tmp_path):
    _, digest = push(srv, tmp_path, "carol", "carols", author="alice")
    carol = srv.client("carol")
    carol.post("/models/carols:1.0.0/promote")
    second = ApiClient(srv.url, srv.ca_pem, carol.request("POST", "/operators/tokens", {"label": "laptop"})["token"])
    key = register_key(second)
    body = signed(key, digest=digest, model="carols:1.0.0", decision="approve", operator="carol", reason="fine")
    code, message = status_of(lambda: second.post("/models/carols:1.0.0/approve", body))
    assert code == 409 and "carol pushed carols:1.0.0 and cannot approve it" in message and "four-eyes" in message

    _, digest = push(srv, tmp_path, "otto", "promoted", author="alice")
    carol.post("/models/promoted:1.0.0/promote")
    body = signed(key, digest=digest, model="promoted:1.0.0", decision="approve", operator="carol", reason="fine")
    code, message = status_of(lambda: second.post("/models/promoted:1.0.0/approve", body))
    assert code == 409 and "carol promoted promoted:1.0.0 to candidate" in message and "four-eyes" in message
    assert carol.get("/models/promoted:1.0.0")["stage"] == "candidate"


def test_an_approval_whose_signature_does_not_verify_is_422_on_signature(srv, tmp_path):
    _, digest = push(srv, tmp_path, "otto", "unsigned", author="alice")
    otto, bob = srv.client("otto"), srv.client("bob")
    otto.post("/models/unsigned:1.0.0/promote")
    key = register_key(bob)
    other = register_key(srv.client("carol"))  # a real key, but not bob's
    fields = {"digest": digest, "model": "unsigned:1.0.0", "decision": "approve", "operator": "bob"}
    cases = {
        "another key": signed(other, **fields, reason="fine"),
        "another reason": {**signed(key, **fields, reason="fine"), "reason": "even finer"},
        "another digest": signed(key, **{**fields, "digest": "0" * 64}, reason="fine"),
        "another decision": signed(key, **{**fields, "decision": "reject"}, reason="fine"),
        "another operator": signed(key, **{**fields, "operator": "carol"}, reason="fine"),
        "too short": {"reason": "fine", "signature": "AAAA"},
        "not base64": {"reason": "fine", "signature": "!!!"},
    }
    for case, body in cases.items():
        code, _, answer = raw(srv, "POST", "/models/unsigned:1.0.0/approve", srv.tokens["bob"],
                              json.dumps(body).encode(), {"Content-Type": "application/json"})
        detail = json.loads(answer)["detail"]
        assert code == 422 and detail[0]["loc"] == ["body", "signature"], (case, answer)
    code, message = status_of(lambda: bob.post("/models/unsigned:1.0.0/approve",
                                               signed(key, **fields, reason=" fine ")))
    assert code == 422 and message.startswith("422: reason: ")  # recorded stripped, it would no longer verify
    assert otto.get("/models/unsigned:1.0.0")["stage"] == "candidate"  # nothing was recorded
    assert bob.post("/models/unsigned:1.0.0/approve", signed(key, **fields, reason="fine"))["to"] == "approved"


def test_a_decision_without_a_registered_key_is_refused(srv, tmp_path):
    push(srv, tmp_path, "otto", "keyless", author="alice")
    srv.client("otto").post("/models/keyless:1.0.0/promote")
    admin = srv.client("admin")  # an admin may approve, but has registered no key
    code, message = status_of(lambda: admin.post("/models/keyless:1.0.0/approve",
                                                 {"reason": "fine", "signature": "A" * 88}))
    assert code == 409 and "admin has no signing key registered" in message


# -- bundle archives ------------------------------------------------------------------------------


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _post_archive(srv: ApiServer, body: bytes, token: str | None = None) -> tuple[int, str]:
    code, _, answer = raw(srv, "POST", "/models/upload", token or srv.tokens["otto"], body,
                          {"Content-Type": "application/octet-stream"})
    detail = json.loads(answer)["detail"]
    return code, detail if isinstance(detail, str) else detail[0]["msg"]


def test_hostile_or_broken_archives_are_refused_and_leave_nothing_behind(srv, tmp_path):
    bundle, _, _ = blob_bundle(tmp_path / "good", srv.key, model="hostile", size=4096, author="alice")
    manifest = (bundle / "manifest.json").read_bytes()
    pax = tarfile.TarInfo("a")
    pax.pax_headers = {"comment": "x" * (100 * 1024)}
    pax_body = io.BytesIO()
    with tarfile.open(fileobj=pax_body, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(pax, io.BytesIO(b""))
    cases = {
        "a symbolic link": (_tar([_file("manifest.json", manifest), _link("artifacts", "/etc")]), "symbolic link"),
        "a hard link": (_tar([_file("manifest.json", manifest), _link("x", "/etc/passwd", tarfile.LNKTYPE)]),
                        "hard link"),
        "an absolute name": (_tar([_file("/tmp/evil", b"x")]), "only relative names"),
        "a parent reference": (_tar([_file("../evil", b"x")]), "'..' is not allowed"),
        "a device": (_tar([_device()]), "a device"),
        "too many members": (_tar([_file(f"f{i}") for i in range(65)]), "more than 64 members"),
        "a name twice": (_tar([_file("manifest.json", manifest), _file("manifest.json", b"{}")]), "given twice"),
        "huge metadata": (pax_body.getvalue(), "metadata header"),
        # a pax size=0 override: tarfile would read a hidden GNU long name (of any size) from "file data"
        "a pax size override": (_pax_size_override(manifest), "sets a member's size"),
        "not a tar": (b"just some bytes, not an archive at all" * 20, "tar"),
        "no manifest": (_tar([_file("readme.txt")]), "holds no manifest.json"),
        "a tampered artifact": (_tar([_file("manifest.json", manifest),
                                      *[_file(f"artifacts/{p.name}", b"tampered") for p in
                                        (bundle / "artifacts").iterdir()]]), "artifact"),
    }
    for case, (body, expected) in cases.items():
        code, message = _post_archive(srv, body)
        assert code == 422 and expected in message, (case, code, message)
    other_key_bundle, _, _ = blob_bundle(tmp_path / "foreign", generate_signing_key(), model="foreign", size=4096,
                                         author="alice")
    code, message = _post_archive(srv, pack(other_key_bundle, tmp_path / "foreign.tar").read_bytes())
    assert code == 422 and "was signed by key" in message and "pinned server key" in message, message
    assert str(srv.data) not in message  # the server's own paths stay on the server
    code, message = _post_archive(srv, b"")
    assert code == 422 and "empty body" in message
    code, _, answer = raw(srv, "POST", "/models/upload", srv.tokens["otto"], b"x" * (CAP + 1),
                          {"Content-Type": "application/octet-stream"})
    assert code == 413, answer
    code, _, answer = raw(srv, "POST", "/models/upload", srv.tokens["otto"], b"{}", {"Content-Type": "text/plain"})
    assert code == 415, answer
    code, _, answer = raw(srv, "POST", "/features", srv.tokens["otto"], b"[" + b" " * (70 * 1024) + b"]",
                          {"Content-Type": "application/json"})
    assert code == 413, answer  # JSON bodies: 64 KiB
    assert not list((srv.data / "uploads").iterdir())
    assert "hostile:1.0.0" not in {m["ref"] for m in srv.client("otto").get("/models")}


def _pax_size_override(payload: bytes) -> bytes:
    def header(name: str, size: int, kind: bytes) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.type = size, kind
        return info.tobuf(format=tarfile.USTAR_FORMAT)

    record = b" size=0\n"
    record = str(len(record) + 2).encode() + record  # "9 size=0\n": the length counts its own digits
    hidden = header("././@LongLink", 100_000, tarfile.GNUTYPE_LONGNAME) + b"a" * 100_000 + \
        b"\0" * (-100_000 % 512) + header("x", 0, tarfile.REGTYPE)
    return (header("././@PaxHeader", len(record), tarfile.XHDTYPE) + record + b"\0" * (-len(record) % 512)
            + header("manifest.json", len(hidden), tarfile.REGTYPE) + hidden + b"\0" * 1024)


def _device() -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo("dev")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, None


# -- audit verify re-checks the approvals -----------------------------------------------------------


def _verify(srv: ApiServer) -> tuple[int, str]:
    from server.cli import app

    out = CliRunner().invoke(app, ["audit", "verify", "--data-dir", str(srv.data)],
                             env={"COLUMNS": "250", "EDGEHERD_DATABASE_URL": None})
    return out.exit_code, " ".join(out.output.split())


def test_audit_verify_names_an_approval_edited_in_the_database(srv, tmp_path):
    _, digest = push(srv, tmp_path, "otto", "tampered", author="alice")
    srv.client("otto").post("/models/tampered:1.0.0/promote")
    bob = srv.client("bob")
    key = register_key(bob)
    bob.post("/models/tampered:1.0.0/approve", signed(key, digest=digest, model="tampered:1.0.0",
                                                      decision="approve", operator="bob", reason="looks right"))
    code, out = _verify(srv)
    assert code == 0 and "audit log OK" in out, out
    assert "approvals OK:" in out and "0 unsigned" in out, out
    [(row_id, reason, actor, signature)] = _sql(
        srv, "SELECT a.id, a.reason, a.actor, a.signature FROM approvals a JOIN model_versions v "
             "ON v.id = a.version_id WHERE v.name = 'tampered'")
    named = f"approval #{row_id} "
    edits = [("UPDATE approvals SET reason = 'rubber stamp' WHERE id = ?", "differs from the audit entry"),
             ("UPDATE approvals SET actor = 'carol' WHERE id = ?", "differs from the audit entry"),
             ("UPDATE approvals SET signature = NULL WHERE id = ?", "differs from the audit entry"),
             ("UPDATE approvals SET audit_seq = NULL WHERE id = ?", "its link to the audit entry"),
             ("DELETE FROM approvals WHERE id = ?", "no approval row records it")]
    (saved,) = _sql(srv, "SELECT * FROM approvals WHERE id = ?", row_id)
    restore = f"INSERT INTO approvals VALUES ({', '.join('?' * len(saved))})"  # noqa: S608 - placeholders only
    try:
        for statement, problem in edits:
            _sql(srv, statement, row_id)
            code, out = _verify(srv)
            assert code == 1 and "approvals FAILED verification" in out and problem in out, (statement, out)
            assert named in out or "tampered:1.0.0" in out, out
            answer = srv.client("vic").get("/audit/verify")
            assert not answer["ok"] and answer["chain"]["ok"] and any(problem in p for p in
                                                                      answer["approvals"]["problems"])
            _sql(srv, "DELETE FROM approvals WHERE id = ?", row_id)
            _sql(srv, restore, *saved)
            assert _verify(srv)[0] == 0
    finally:
        _sql(srv, "DELETE FROM approvals WHERE id = ?", row_id)
        _sql(srv, restore, *saved)
    assert (reason, actor, signature is not None) == ("looks right", "bob", True)
