"""The command line as the operator API's client: ``edgeherd login``, ``operator …`` and the fleet commands acting
through a real ``edgeherd server run`` over HTTPS.

Every command runs as its own ``python -m server.cli`` process; each operator has their own configuration
directory (``XDG_CONFIG_HOME``), so two operators hold two logins and two signing keys.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlmodel import Session, select

from protocol.signing import generate_signing_key, load_private_key, public_key_to_text
from server.api.client import ApiError
from server.cli.remote import AS_WITH_LOGIN
from server.db.models import Approval
from server.governance import Role
from server.registry import Registry
from server.signatures import verify_decision
from tests.api_helpers import ApiServer, api_server
from tests.features_helpers import DEFINITIONS
from tests.server_helpers import blob_bundle, server_dir

ROOT = Path(__file__).resolve().parents[1]
#: Environment a login (or the API's address) could come from, which no test's command may inherit.
LOGIN_ENV = ("EDGEHERD_URL", "EDGEHERD_CA", "EDGEHERD_TOKEN", "EDGEHERD_OPERATOR", "EDGEHERD_DATA_DIR",
             "EDGEHERD_API_LISTEN")


@dataclass
class Home:
    """One operator's configuration directory: their login and signing key."""

    path: Path

    @property
    def login_file(self) -> Path:
        return self.path / "edgeherd" / "login.json"

    @property
    def key_file(self) -> Path:
        return self.path / "edgeherd" / "operator.key"


def cli(home: Home, *args: str, ok: bool = True, extra_env: dict[str, str] | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``edgeherd ARGS`` as a process with ``home``'s configuration; asserts its exit status (0 when ``ok``)."""
    env = {k: v for k, v in os.environ.items() if k not in LOGIN_ENV}
    env |= {"XDG_CONFIG_HOME": str(home.path), "PYTHONPATH": str(ROOT), "COLUMNS": "250", "NO_COLOR": "1"}
    env |= extra_env or {}
    result = subprocess.run([sys.executable, "-m", "server.cli", *args], env=env, capture_output=True, text=True,
                            input=stdin if stdin is not None else "", timeout=120, check=False)
    assert (result.returncode == 0) == ok, (f"edgeherd {' '.join(args)} exited {result.returncode}\n"
                                            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def _token_file(home: Home, token: str) -> Path:
    path = home.path / "token.txt"
    path.write_text(token + "\n")
    return path


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    tmp = tmp_path_factory.mktemp("api-cli")
    os.chmod(tmp, tmp.stat().st_mode | 0o001)  # the managed broker's user reaches the data directory in it
    with api_server(tmp, {"otto": Role.OPERATOR, "bob": Role.APPROVER}) as server:
        yield server


@pytest.fixture(scope="module")
def homes(srv: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Home]:
    """admin, otto and bob, each logged in with their own token (`edgeherd login --token-file`)."""
    out = {}
    for name in ("admin", "otto", "bob"):
        home = Home(tmp_path_factory.mktemp(f"home-{name}"))
        cli(home, "login", srv.url, "--ca", str(srv.ca_file), "--token-file", str(_token_file(home, srv.tokens[name])))
        out[name] = home
    return out


def _other_ca(path: Path) -> Path:
    """A self-signed CA that did not issue the server's certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else's CA")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# -- login ------------------------------------------------------------------------------------------------------


def test_login_checks_the_server_and_stores_the_login_0600(srv: ApiServer, tmp_path: Path) -> None:
    home = Home(tmp_path / "cfg")
    out = cli(home, "login", srv.url, "--ca", str(srv.ca_file), extra_env={"EDGEHERD_TOKEN": srv.tokens["otto"]})
    assert "as otto (operator" in out.stdout
    assert stat.S_IMODE(home.login_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.login_file.parent.stat().st_mode) == 0o700
    stored = json.loads(home.login_file.read_text())
    assert stored["url"] == srv.url and stored["token"] == srv.tokens["otto"] and stored["ca"] == srv.ca_pem
    assert "otto (operator)" in cli(home, "operator", "whoami").stdout
    cli(home, "logout")
    assert not home.login_file.exists()
    assert "no login" in cli(home, "operator", "whoami").stdout


def test_login_refuses_a_ca_that_did_not_issue_the_servers_certificate(srv: ApiServer, tmp_path: Path) -> None:
    home = Home(tmp_path / "cfg")
    out = cli(home, "login", srv.url, "--ca", str(_other_ca(tmp_path / "other.pem")), "--token-file",
              str(_token_file(Home(tmp_path), srv.tokens["otto"])), ok=False)
    assert "certificate does not verify" in out.stderr
    assert not home.login_file.exists()


def test_login_refuses_a_bad_token_and_an_unreachable_server(srv: ApiServer, tmp_path: Path) -> None:
    home = Home(tmp_path / "cfg")
    bad = "eh_000000000000_" + "A" * 43
    out = cli(home, "login", srv.url, "--ca", str(srv.ca_file), ok=False, stdin=bad + "\n")  # the token on stdin
    assert "401" in out.stderr and "unknown token" in out.stderr
    out = cli(home, "login", "https://127.0.0.1:1", "--ca", str(srv.ca_file), ok=False,
              extra_env={"EDGEHERD_TOKEN": srv.tokens["otto"]})
    assert "cannot reach https://127.0.0.1:1" in out.stderr
    assert not home.login_file.exists()


def test_as_is_refused_with_a_login(homes: dict[str, Home]) -> None:
    out = cli(homes["otto"], "--as", "admin", "device", "list", ok=False)
    assert AS_WITH_LOGIN in " ".join(out.stderr.split())


# -- operators, tokens, keys --------------------------------------------------------------------------------------


def test_operator_add_token_and_revoke(srv: ApiServer, homes: dict[str, Home]) -> None:
    out = cli(homes["admin"], "operator", "add", "carol", "--role", "viewer", "--ttl-days", "7")
    token = out.stdout.split("shown only this once:")[1].split()[0]
    assert srv.client(token=token).get("/whoami")["operator"] == "carol"

    out = cli(homes["admin"], "operator", "token", "--for", "carol", "--scope", "push", "--label", "ci job")
    assert "new push token" in out.stdout
    push_token = out.stdout.split("shown only this once:")[1].split()[0]
    me = srv.client(token=push_token).get("/whoami")
    assert (me["operator"], me["scope"]) == ("carol", "push")

    listed = cli(homes["admin"], "operator", "tokens").stdout
    assert me["token"] in listed and "ci job" in listed
    cli(homes["admin"], "operator", "revoke", me["token"])
    with pytest.raises(ApiError) as refused:
        srv.client(token=push_token).get("/whoami")
    assert refused.value.status == 401 and "revoked" in str(refused.value)

    out = cli(homes["otto"], "operator", "add", "mallory", "--role", "admin", ok=False)  # otto is no admin
    assert "403" in out.stderr


def test_keygen_writes_a_0600_key_and_registers_it(srv: ApiServer, homes: dict[str, Home]) -> None:
    bob = homes["bob"]
    if not bob.key_file.exists():
        cli(bob, "operator", "keygen")
    assert stat.S_IMODE(bob.key_file.stat().st_mode) == 0o600
    public = public_key_to_text(load_private_key(bob.key_file.read_bytes()).public_key())
    keys = {k["operator"]: k["public_key"] for k in srv.client("bob").get("/operators/keys")}
    assert keys["bob"] == public
    before = bob.key_file.read_bytes()
    out = cli(bob, "operator", "keygen", ok=False)
    assert "--force" in out.stderr and bob.key_file.read_bytes() == before
    cli(bob, "operator", "keygen", "--force")  # the key it replaces signs the replacement
    assert bob.key_file.read_bytes() != before
    assert srv.client("bob").get("/whoami")["public_key"] == public_key_to_text(
        load_private_key(bob.key_file.read_bytes()).public_key())


# -- models: push, promote, signed approval -------------------------------------------------------------------------


def test_push_promote_and_a_signed_approval_by_another_operator(srv: ApiServer, homes: dict[str, Home],
                                                               tmp_path: Path) -> None:
    otto, bob = homes["otto"], homes["bob"]
    bundle, _, digest = blob_bundle(tmp_path / "b1", srv.key, model="cam", version="1.0.0")
    out = cli(otto, "model", "push", str(bundle))
    assert f"registered cam 1.0.0 (digest {digest[:12]}" in out.stdout
    assert "cam" in cli(otto, "model", "list").stdout
    out = cli(otto, "model", "promote", "cam:1.0.0")
    assert "draft → candidate by otto" in out.stdout
    out = cli(otto, "model", "approve", "cam:1.0.0", "--reason", "mine", ok=False)
    assert "otto is an operator; approving a version needs the approver role" in " ".join(out.stderr.split())

    kept = bob.key_file.read_bytes() if bob.key_file.exists() else None
    bob.key_file.unlink(missing_ok=True)
    out = cli(bob, "model", "approve", "cam:1.0.0", "--reason", "looks good", ok=False)
    assert "operator keygen" in out.stderr  # decisions are signed: no key, no approval
    if kept is None:
        cli(bob, "operator", "keygen")
    else:  # the key registered for bob already: a new one would need its signature (or an admin)
        bob.key_file.write_bytes(kept)
    out = cli(bob, "model", "approve", "cam:1.0.0", "--reason", "accuracy holds on the eval set")
    assert "candidate → approved by bob" in out.stdout
    shown = cli(bob, "model", "show", "cam:1.0.0").stdout
    assert "(approved)" in shown and "bob approved: accuracy holds on the eval set" in shown

    registry = Registry(srv.data)  # the approval row: signed with bob's key, over this manifest
    try:
        with Session(registry.engine) as db:
            row = db.exec(select(Approval).where(Approval.actor == "bob")).one()
    finally:
        registry.engine.dispose()
    public = public_key_to_text(load_private_key(bob.key_file.read_bytes()).public_key())
    assert row.signature and row.public_key == public
    verify_decision(public, row.signature, manifest_sha256=digest, model="cam:1.0.0", decision="approve",
                    operator="bob", reason="accuracy holds on the eval set")
    out = cli(otto, "audit", "verify")  # GET /audit/verify: the chain and the signature, checked by the server
    assert "audit log OK (checked by" in out.stdout and "1 signed and verified" in out.stdout


def test_an_approver_cannot_approve_what_they_pushed(srv: ApiServer, homes: dict[str, Home], tmp_path: Path) -> None:
    bob = homes["bob"]
    if not bob.key_file.exists():
        cli(bob, "operator", "keygen")
    bundle, _, _ = blob_bundle(tmp_path / "b2", srv.key, model="cam", version="2.0.0")
    cli(bob, "model", "push", str(bundle))
    cli(bob, "model", "promote", "cam:2.0.0")
    out = cli(bob, "model", "approve", "cam:2.0.0", "--reason", "mine", ok=False)
    assert "409" in out.stderr and "four-eyes" in " ".join(out.stderr.split()).lower()
    assert srv.client("admin").get("/models/cam:2.0.0")["stage"] == "candidate"


# -- devices, rollouts, audit -----------------------------------------------------------------------------------


def test_device_add_and_list(srv: ApiServer, homes: dict[str, Home], tmp_path: Path) -> None:
    out_dir = tmp_path / "cam-7"
    out = cli(homes["otto"], "device", "add", "cam-7", "--profile", "raspberry-pi-5", "--group", "lab",
              "--out", str(out_dir))
    assert "enrolled cam-7" in out.stdout
    config = out_dir / "agent.toml"
    assert 'device_id = "cam-7"' in config.read_text()
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in out_dir.iterdir())
    listed = cli(homes["otto"], "device", "list").stdout
    assert "cam-7" in listed and "lab" in listed
    out = cli(homes["otto"], "device", "add", "cam-7", "--profile", "raspberry-pi-5", ok=False)
    assert "already exists" in out.stderr
    assert "revoked cam-7" in cli(homes["otto"], "device", "revoke", "cam-7").stdout
    assert srv.client("admin").get("/devices/cam-7")["row"]["status"] == "revoked"
    out = cli(homes["otto"], "device", "revoke", "cam-8", ok=False)
    assert "404" in out.stderr


def test_rollout_start_list_show_pause(srv: ApiServer, homes: dict[str, Home], tmp_path: Path) -> None:
    otto = homes["otto"]
    bundle, _, _ = blob_bundle(tmp_path / "b3", srv.key, model="det", version="1.0.0")
    cli(otto, "model", "push", str(bundle))
    registry = Registry(srv.data)
    try:
        registry.add_device("det-1", "raspberry-pi-5", ["bench"], actor="admin")
    finally:
        registry.engine.dispose()
    out = cli(otto, "rollout", "start", "det-bench", "--model", "det:1.0.0", "--group", "bench", "--soak", "60")
    assert "rollout det-bench of det:1.0.0 recorded" in out.stdout
    assert srv.client("admin").get("/rollouts/det-bench")["created_by"] == "otto"
    listed = cli(otto, "rollout", "list").stdout
    assert "det-bench" in listed and "det:1.0.0" in listed
    shown = cli(otto, "rollout", "show", "det-bench").stdout
    assert "det-bench" in shown and "started by otto" in shown
    out = cli(otto, "rollout", "pause", "det-bench", "--reason", "checking the canary")
    assert "is now paused" in out.stdout
    assert srv.client("admin").get("/rollouts/det-bench")["row"]["state"] == "paused"
    out = cli(otto, "rollout", "pause", "no-such-rollout", ok=False)
    assert "404" in out.stderr
    assert "is now aborted" in cli(otto, "rollout", "abort", "det-bench", "--reason", "enough").stdout

    out = cli(otto, "deploy", "det:1.0.0", "--device", "det-1")
    assert "det-1 will run det:1.0.0 once it connects" in out.stdout
    out = cli(otto, "deploy", "det:1.0.0", "--device", "det-1", "--artifact", "blob", ok=False)
    assert "--artifact is not available with a login" in " ".join(out.stderr.split())


def test_audit_list_through_the_api(homes: dict[str, Home], srv: ApiServer) -> None:
    public = public_key_to_text(generate_signing_key().public_key())
    srv.client("otto").request("PUT", "/operators/me/key", {"public_key": public})
    out = cli(homes["bob"], "audit", "list", "--action", "operator.key_register", "--actor", "otto")
    assert "operator:otto" in out.stdout and public in out.stdout
    assert "operator.token_issue" not in out.stdout and "operator:bob" not in out.stdout
    out = cli(homes["bob"], "audit", "list", "--actor", "nobody-at-all")
    assert "no audit entries match" in out.stdout


def test_features_push_list_show(homes: dict[str, Home], tmp_path: Path) -> None:
    otto = homes["otto"]
    definitions = tmp_path / "features.toml"
    definitions.write_text(DEFINITIONS)
    out = cli(otto, "features", "push", str(definitions))
    assert "added  crest_factor@1" in out.stdout and "added  site@1" in out.stdout
    assert "unchanged  crest_factor@1" in cli(otto, "features", "push", str(definitions)).stdout
    listed = cli(otto, "features", "list").stdout
    assert "crest_factor" in listed and "vibration-team" in listed and "ratio(numerator=vib_peak" in listed
    shown = cli(otto, "features", "show", "crest_factor").stdout
    assert "crest_factor@1" in shown and "owner vibration-team" in shown and "by otto" in shown
    out = cli(otto, "features", "drift", "crest_factor", ok=False)
    assert "no model version consumes feature 'crest_factor'" in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[[feature]]\nname = 'x'\n")
    out = cli(otto, "features", "push", str(bad), ok=False)  # checked here first, named with its file
    assert "bad.toml" in out.stderr


# -- on the server host: server init, operator add without a login --------------------------------------------------


def test_server_init_prints_the_token_and_login_line_once(tmp_path: Path) -> None:
    data, _ = server_dir(tmp_path / "data")
    home = Home(tmp_path / "cfg")  # no login: the server host's own commands
    out = cli(home, "--as", "root", "server", "init", "--admin", "ada", "--data-dir", str(data))
    token = out.stdout.split("shown only this once:")[1].split()[0]
    ca = (data / "pki" / "ca-bundle.pem").resolve()
    assert f"edgeherd login https://127.0.0.1:9443 --ca {ca}" in out.stdout
    assert "default" in out.stdout
    assert 'name = "ada"' in (data / "operators.toml").read_text()
    registry = Registry(data)
    try:
        from server.api.tokens import authenticate

        with Session(registry.engine) as db:
            assert authenticate(db, token).operator == "ada"
    finally:
        registry.engine.dispose()
    again = cli(home, "server", "init", "--admin", "eve", "--data-dir", str(data), ok=False)
    assert "already exists" in again.stderr

    out = cli(home, "--as", "ada", "operator", "add", "ben", "--role", "operator", "--data-dir", str(data))
    assert "added ben (operator)" in out.stdout
    out = cli(home, "--as", "ben", "operator", "add", "cid", "--role", "admin", "--data-dir", str(data), ok=False)
    assert "admin" in out.stderr
