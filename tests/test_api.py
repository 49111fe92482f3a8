"""The operator API's endpoints on a real ``edgeherd server run`` over HTTPS: every one works with a token.

One server for the module; each test uses names of its own (model, devices, rollouts), so they do not interfere.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import ssl
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import Session

from protocol import Manifest, SignedManifest, decode_model, encode_model
from protocol.signing import generate_signing_key, public_key_to_text, sign_manifest
from server import audit
from server.api.client import ApiClient, ApiError
from server.db import make_engine
from server.db.models import Alert
from server.governance import Role
from server.signatures import sign_decision
from tests.api_helpers import ApiServer, api_server
from tests.features_helpers import DEFINITIONS
from tests.server_helpers import blob_bundle

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("api")
    os.chmod(tmp, 0o701)  # the managed broker (user mosquitto) reaches the data directory inside
    with api_server(tmp, {"otto": Role.OPERATOR, "bob": Role.APPROVER, "vic": Role.VIEWER}) as server:
        yield server


# -- helpers shared with tests/test_api_security.py ------------------------------------------------


def pack(bundle: Path, dest: Path, *, gz: bool = False, top: str | None = None) -> Path:
    """``bundle`` as a tar (gzip'd with ``gz``), its files at the top or under the directory ``top``."""
    with tarfile.open(dest, "w:gz" if gz else "w") as tar:
        for path in sorted(bundle.rglob("*")):
            rel = str(path.relative_to(bundle))
            tar.add(path, arcname=f"{top}/{rel}" if top else rel, recursive=False)
    return dest


def upload(client: ApiClient, archive: Path) -> Any:
    return client.request("POST", "/models/upload", upload=archive)


def push(srv: ApiServer, tmp: Path, operator: str, model: str, version: str = "1.0.0", *,
         author: str | None = "alice") -> tuple[dict[str, Any], str]:
    """A fresh signed bundle uploaded by ``operator``: (the answer, the manifest digest)."""
    bundle, _, digest = blob_bundle(tmp / f"{model}-{version}", srv.key, model=model, version=version,
                                    size=4096, author=author)
    return upload(srv.client(operator), pack(bundle, tmp / f"{model}-{version}.tar")), digest


#: The private keys registered so far, by (server, operator): a new one replaces the last with its signature.
_KEYS: dict[tuple[str, str], Ed25519PrivateKey] = {}


def register_key(client: ApiClient) -> Ed25519PrivateKey:
    """A fresh key for the client's operator, registered (signed by the key it replaces, when there is one)."""
    from server.signatures import sign_key_replacement

    me = client.get("/whoami")["operator"]
    key = generate_signing_key()
    public = public_key_to_text(key.public_key())
    body = {"public_key": public}
    if (client.url, me) in _KEYS:
        body["previous_signature"] = sign_key_replacement(_KEYS[(client.url, me)], public)
    client.request("PUT", "/operators/me/key", body)
    _KEYS[(client.url, me)] = key
    return key


def signed(key: Ed25519PrivateKey, *, digest: str, model: str, decision: str, operator: str, reason: str
           ) -> dict[str, str]:
    return {"reason": reason, "signature": sign_decision(key, manifest_sha256=digest, model=model, decision=decision,
                                                         operator=operator, reason=reason)}


def raw(srv: ApiServer, method: str, path: str, token: str | None, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A request without the client's JSON handling: (status, headers, body)."""
    conn = http.client.HTTPSConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1]), timeout=60,
                                       context=ssl.create_default_context(cadata=srv.ca_pem))
    try:
        conn.request(method, "/api/v1" + path, body=body,
                     headers={**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def status_of(call: Any) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value.status, str(caught.value)


# -- models, approvals, deploys and rollouts --------------------------------------------------------


def test_a_version_goes_from_upload_to_rollouts(srv, tmp_path):
    otto, bob = srv.client("otto"), srv.client("bob")
    answer, digest = push(srv, tmp_path, "otto", "lifecycle")
    assert answer == {"model": "lifecycle", "version": "1.0.0", "stage": "draft", "manifest_sha256": digest}
    assert not list((srv.data / "uploads").iterdir())  # the upload's temporary files are gone
    assert upload(otto, tmp_path / "lifecycle-1.0.0.tar") == answer  # the same bundle again changes nothing
    assert "lifecycle:1.0.0" in {m["ref"] for m in otto.get("/models")}
    shown = otto.get("/models/lifecycle:1.0.0")
    assert shown["stage"] == "draft" and shown["author"] == "alice"

    assert otto.post("/models/lifecycle:1.0.0/promote")["to"] == "candidate"
    key = register_key(bob)
    decided = bob.post("/models/lifecycle:1.0.0/approve", signed(key, digest=digest, model="lifecycle:1.0.0",
                                                                 decision="approve", operator="bob",
                                                                 reason="held-out accuracy fine"))
    assert decided["from"] == "candidate" and decided["to"] == "approved"
    approvals = otto.get("/models/lifecycle:1.0.0")["approvals"]
    assert [(a["actor"], a["decision"]) for a in approvals] == [("bob", "approve")]

    enrolled = otto.post("/devices", {"id": "life-1", "profile": "raspberry-pi-5", "groups": ["life"]})
    assert otto.post("/models/lifecycle:1.0.0/deploy", {"device": "life-1"})["result"].startswith("life-1 ")
    assert enrolled["device"]["groups"] == ["life"]

    started = otto.post("/rollouts", {"name": "life-r1", "model": "lifecycle:1.0.0", "target": {"groups": ["life"]}})
    assert started["name"] == "life-r1" and started["state"] in ("pending", "running")
    assert otto.post("/rollouts/life-r1/pause", {"reason": "look first"})["state"] == "paused"
    assert otto.post("/rollouts/life-r1/resume")["state"] == "running"
    assert otto.post("/rollouts/life-r1/abort", {"reason": "enough"})["state"] == "aborted"
    assert status_of(lambda: otto.post("/rollouts/life-r1/resume"))[0] == 409
    otto.post("/rollouts", {"name": "life-r2", "model": "lifecycle:1.0.0", "target": {"devices": ["life-1"]}})
    assert otto.post("/rollouts/life-r2/rollback")["state"] in ("rolling_back", "rolled_back")
    names = [r["name"] for r in otto.get("/rollouts")]
    assert {"life-r1", "life-r2"} <= set(names)
    detail = otto.get("/rollouts/life-r1")
    assert detail["row"]["state"] == "aborted" and detail["created_by"] == "otto"
    assert status_of(lambda: otto.get("/rollouts/no-such"))[0] == 404

    assert srv.client("admin").post("/models/lifecycle:1.0.0/retire")["to"] == "retired"
    code, message = status_of(lambda: otto.post("/rollouts", {"name": "life-r3", "model": "lifecycle:1.0.0",
                                                              "target": {"groups": ["life"]}}))
    assert code == 409 and "retired" in message


def test_a_rejection_is_signed_and_sends_the_candidate_back(srv, tmp_path):
    otto, bob = srv.client("otto"), srv.client("bob")
    _, digest = push(srv, tmp_path, "otto", "rejected")
    otto.post("/models/rejected:1.0.0/promote")
    key = register_key(bob)
    body = signed(key, digest=digest, model="rejected:1.0.0", decision="reject", operator="bob", reason="too slow")
    assert bob.post("/models/rejected:1.0.0/reject", body)["to"] == "draft"


# -- devices ------------------------------------------------------------------------------------


def test_enrolling_answers_with_the_agent_files_once_and_not_cached(srv):
    body = json.dumps({"id": "enrol-1", "profile": "x86-64-cpu", "groups": ["lab", "kitchen"]}).encode()
    code, headers, raw_body = raw(srv, "POST", "/devices", srv.tokens["otto"], body,
                                  {"Content-Type": "application/json"})
    assert code == 201, raw_body
    answer = json.loads(raw_body)
    assert headers["cache-control"] == "no-store"
    assert "secret" in answer and "not shown again" in answer["secret"]
    files = answer["files"]
    on_disk = {p.name: p.read_text() for p in (srv.data / "devices" / "enrol-1").iterdir()}
    assert files == on_disk and 'device_id = "enrol-1"' in files["agent.toml"]
    assert ("device.key" in files and "BEGIN" in files["device.key"]) or "broker-password" in files
    assert answer["device"]["id"] == "enrol-1" and answer["device"]["profile"] == "x86-64-cpu"
    entry = srv.client("otto").get("/audit", text="device.add enrol-1", limit=500)["entries"][0]
    assert entry["actor"] == "otto" and entry["action"] == "device.add"
    assert "BEGIN" not in json.dumps(entry) and (not files.get("broker-password")
                                                 or files["broker-password"].strip() not in json.dumps(entry))

    otto = srv.client("otto")
    code, message = status_of(lambda: otto.post("/devices", {"id": "enrol-1", "profile": "x86-64-cpu"}))
    assert code == 409 and "already exists" in message
    code, message = status_of(lambda: otto.post("/devices", {"id": "enrol-2", "profile": "toaster"}))
    assert code == 422 and message.startswith("422: profile:")
    assert otto.post("/devices", {"id": "enrol-2", "profile": "toaster", "custom_profile": True})["device"][
        "profile"] == "toaster"
    code, message = status_of(lambda: otto.post("/devices", {"id": "Enrol_3", "profile": "x86-64-cpu"}))
    assert code == 422 and "id" in message
    code, message = status_of(lambda: otto.post("/devices", {"id": "enrol-4", "profile": "x86-64-cpu",
                                                             "password": "x"}))
    assert code == 422 and "password" in message  # unknown fields are refused

    listed = {d["id"]: d for d in otto.get("/devices")}
    assert {"enrol-1", "enrol-2"} <= set(listed)
    assert otto.get("/devices/enrol-1")["row"]["profile"] == "x86-64-cpu"
    assert otto.post("/devices/enrol-2/revoke") == {"device": "enrol-2", "revoked": True}
    assert not (srv.data / "devices" / "enrol-2").exists()


def test_rotating_an_offline_device_is_refused_and_changes_nothing(srv):
    otto = srv.client("otto")
    otto.post("/devices", {"id": "rotate-1", "profile": "x86-64-cpu"})
    before = {p.name: p.read_bytes() for p in (srv.data / "devices" / "rotate-1").iterdir()}
    code, message = status_of(lambda: otto.post("/devices/rotate-1/rotate-credentials", {"timeout": 1}))
    assert code == 409 and "did not confirm its new credentials" in message
    assert {p.name: p.read_bytes() for p in (srv.data / "devices" / "rotate-1").iterdir()} == before
    assert status_of(lambda: otto.post("/devices/nowhere/rotate-credentials", {}))[0] == 404


# -- features ------------------------------------------------------------------------------------


def featured_bundle(path: Path, key: Ed25519PrivateKey, definition: dict[str, Any]) -> Path:
    """A signed bundle whose model consumes the registry feature ``definition`` (a ratio of two raw columns)."""
    bundle, _, _ = blob_bundle(path, key, model="featured", size=4096, author="alice")
    m = decode_model(SignedManifest, (bundle / "manifest.json").read_bytes()).manifest
    edges = [1.0 + 0.9 * i for i in range(11)]
    fields = m.model_dump() | {
        "features": {"inputs": ["vib_rms", "vib_peak"], "definitions": [definition]},
        "reference": {"kind": "features", "n": 100, "features": [{"name": definition["name"], "version": 1,
                                                                   "edges": edges, "counts": [10] * 10,
                                                                   "mean": 5.0, "std": 2.0}]},
        "lineage": {"features": f"{definition['name']}@1"}}
    (bundle / "manifest.json").write_bytes(encode_model(sign_manifest(Manifest.model_validate(fields), key)))
    return bundle


def test_features_push_list_show_and_drift(srv, tmp_path):
    otto = srv.client("otto")
    file = tomllib.loads(DEFINITIONS)
    refs = ["crest_factor@1", "load_log@1", "temp_scaled@1", "rms_clipped@1", "site@1"]
    assert otto.post("/features", file) == [{"feature": r, "result": "added"} for r in refs]
    assert otto.post("/features", file) == [{"feature": r, "result": "unchanged"} for r in refs]
    changed = json.loads(json.dumps(file))
    changed["feature"][0]["owner"] = "other-team"
    code, message = status_of(lambda: otto.post("/features", changed))
    assert code == 409 and "crest_factor@1 is already registered with another definition" in message
    assert "give it version 2" in message
    broken = {"feature": [dict(file["feature"][0], min=5.0, max=1.0)]}
    code, message = status_of(lambda: otto.post("/features", broken))
    assert code == 422 and "min 5.0 must be below max 1.0" in message

    listed = {f["feature"]: f for f in otto.get("/features")}
    assert set(refs) <= set(listed)
    assert listed["crest_factor@1"]["owner"] == "vibration-team" and listed["crest_factor@1"]["pushed_by"] == "otto"
    shown = otto.get("/features/temp_scaled")
    assert [f["version"] for f in shown] == [1] and shown[0]["definition"]["transform"]["offset"] == 50.0
    assert status_of(lambda: otto.get("/features/nothing"))[0] == 404
    assert otto.get("/features/load_log/drift", hours=0) == []  # registered, consumed by no version
    assert status_of(lambda: otto.get("/features/nothing/drift"))[0] == 404

    upload(otto, pack(featured_bundle(tmp_path / "featured", srv.key, file["feature"][0]), tmp_path / "f.tar"))
    assert otto.get("/features/crest_factor")[0]["consumed_by"] == ["featured:1.0.0"]
    [row] = otto.get("/features/crest_factor/drift", hours=0)
    assert (row["feature"], row["model"], row["windows"], row["n"]) == ("crest_factor@1", "featured:1.0.0", 0, 0)
    assert row["drifted"] is False  # no statistics yet; scores that are not numbers come as null, not NaN
    pushed = otto.get("/audit", text="feature.push crest_factor", limit=500)["entries"]
    assert [e["actor"] for e in pushed] == ["otto"]


# -- alerts, drift and the audit log ------------------------------------------------------------------


def test_alerts_are_the_active_ones_and_the_recently_cleared(srv):
    now = datetime.now(timezone.utc)
    engine = make_engine(f"sqlite:///{srv.data / 'edgeherd.db'}")
    try:
        with Session(engine) as db:
            db.add(Alert(kind="drift", device_id="alert-1", active=True, detail={"worst": "pixel_13"},
                         raised_at=now - timedelta(minutes=5)))
            db.add(Alert(kind="latency", device_id="alert-2", active=False, raised_at=now - timedelta(hours=3),
                         cleared_at=now - timedelta(hours=1)))
            db.add(Alert(kind="drift", device_id="alert-3", active=False, raised_at=now - timedelta(days=3),
                         cleared_at=now - timedelta(days=2)))
            db.commit()
    finally:
        engine.dispose()
    vic = srv.client("vic")
    mine = [a for a in vic.get("/alerts") if a["device_id"] and a["device_id"].startswith("alert-")]
    assert [(a["device_id"], a["active"]) for a in mine] == [("alert-2", False), ("alert-1", True)]
    assert mine[1]["detail"] == {"worst": "pixel_13"} and mine[0]["cleared_at"] is not None
    assert [a["device_id"] for a in vic.get("/alerts", active="true") if a["device_id"].startswith("alert-")] == [
        "alert-1"]
    assert {a["device_id"] for a in vic.get("/alerts", hours=72)} >= {"alert-1", "alert-2", "alert-3"}
    assert isinstance(vic.get("/drift"), list)


def test_audit_list_verify_and_export(srv):
    vic = srv.client("vic")
    listed = vic.get("/audit", limit=5)
    assert listed["verified"]["ok"] and len(listed["entries"]) == 5
    verified = vic.get("/audit/verify")
    assert verified["ok"] and verified["chain"]["ok"] and verified["approvals"]["ok"]
    assert verified["chain"]["anchor"] is not None

    code, headers, body = raw(srv, "GET", "/audit/export", srv.tokens["vic"])
    assert code == 200 and headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1))
    assert len(lines) >= verified["chain"]["entries"]
    prev = audit.GENESIS
    for e in lines:  # the export verifies on its own: every hash recomputed from the exported fields
        assert e["prev_hash"] == prev
        at = datetime.fromisoformat(e["at"])
        assert audit.entry_hash(e["seq"], at, e["actor"], e["action"], e["subject"], e["detail"], prev) == e["hash"]
        prev = e["hash"]
    code, _, tail = raw(srv, "GET", "/audit/export?after=3", srv.tokens["vic"])
    assert code == 200 and json.loads(tail.decode().splitlines()[0])["seq"] == 4


def test_whoami_and_tokens(srv):
    otto = srv.client("otto")
    me = otto.get("/whoami")
    assert me["operator"] == "otto" and me["role"] == "operator" and me["scope"] == "full"
    made = otto.request("POST", "/operators/tokens", {"label": "ci", "scope": "push", "ttl_days": 1})
    assert made["token_info"]["scope"] == "push" and made["token"].startswith("eh_")
    assert ApiClient(srv.url, srv.ca_pem, made["token"]).get("/whoami")["scope"] == "push"
    mine = {t["id"] for t in otto.get("/operators/tokens")}
    assert made["token_info"]["id"] in mine
    assert otto.request("DELETE", f"/operators/tokens/{made['token_info']['id']}")["revoked_at"] is not None


def test_gzip_archives_with_a_top_directory_upload_too(srv, tmp_path):
    bundle, _, digest = blob_bundle(tmp_path / "zipped", srv.key, model="zipped", size=4096, author="alice")
    archive = pack(bundle, tmp_path / "zipped.tar.gz", gz=True, top="zipped-1.0.0")
    with gzip.open(archive) as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
        assert tar.getnames()[0].startswith("zipped-1.0.0/")
    assert upload(srv.client("otto"), archive)["manifest_sha256"] == digest
