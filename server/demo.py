"""``edgeherd demo``: the whole system, end to end, on this machine, narrated.

1. Build and sign the digits model (v1; reused when already built), and a v2 whose graph inverts its input
   (white-on-black taken for black-on-white) — a broken preprocessing step that raises no error and passes
   its own smoke test.
2. Start the server with a managed Mosquitto on SQLite, and six real agent processes with their own
   credentials (two Raspberry Pi 5 and a Pi 4 on LiteRT int8, a Jetson Orin Nano on ONNX Runtime — its
   TensorRT path is unavailable here and says so — and two x86-64 on ONNX Runtime).
3. Send the digits test set to every agent's local API, continuously.
4. v1: pushed, then through the operator API (HTTPS, a token per operator): promoted by one operator, approved
   by a second who signs the decision with their own Ed25519 key, rolled out in canary waves to the production
   group by a third.
5. v2: the same path; its canary's predictions depart from the training labels, the ``predictions`` gate
   fails, the canary is rolled back automatically.
6. One device's inputs shift (brighter digits): its drift alert is raised, and nobody else's.

Everything runs in a temporary directory or ``--data-dir``; Ctrl-C stops every process it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table
from sqlmodel import Session, col, select

from server.api.client import ApiClient
from server.demo_agents import DemoAgent, Traffic, start_agents, stopping
from server.errors import ServerError

__all__ = ["DEVICES", "DemoFailed", "DemoResult", "run_demo"]

#: (device id, hardware profile): the fleet the demo provisions.
DEVICES = [("pi5-kitchen", "raspberry-pi-5"), ("pi5-garage", "raspberry-pi-5"), ("pi4-shed", "raspberry-pi-4"),
           ("orin-dock", "jetson-orin-nano"), ("x86-office", "x86-64-cpu"), ("x86-lab", "x86-64-cpu")]
#: The device whose inputs the demo shifts.
SHIFTED = "x86-lab"
GROUP = "demo"
OPERATORS = f"""# the demo's operators (docs/governance.md)
production_groups = ["{GROUP}"]

[[operator]]
name = "ml-engineer"
role = "operator"

[[operator]]
name = "reviewer"
role = "approver"

[[operator]]
name = "ops"
role = "operator"
"""


class DemoFailed(ServerError):
    """A step did not reach what it should have; the message says which and where to look."""


@dataclass
class DemoResult:
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: How the v1 rollout ended, and the v2 one.
    v1_state: str | None = None
    v2_state: str | None = None
    #: The gates that failed v2, the wave they failed it at, and their numbers.
    v2_gates: list[str] = field(default_factory=list)
    v2_wave: int | None = None
    v2_numbers: dict[str, Any] = field(default_factory=dict)
    #: The devices v2 was sent to (the canary only, when the story holds).
    v2_devices: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def v2_gate(self) -> str | None:
        return self.v2_gates[0] if self.v2_gates else None

    def problems(self) -> list[str]:
        """Where the run departed from what the demo narrates: v1 rolled out everywhere, v2 stopped at its
        canary (wave 0, one device) by the predictions gate and rolled back, one drift alert on SHIFTED."""
        out = []
        if self.v1_state != "completed":
            out.append(f"the v1 rollout ended {self.v1_state}, not completed")
        not_v1 = sorted(d for d, row in self.devices.items() if row["version"] != "digits:1.0.0")
        if not_v1 or len(self.devices) != len(DEVICES):
            out.append(f"not every device runs digits:1.0.0 ({', '.join(not_v1) or 'devices missing'})")
        if self.v2_state != "rolled_back":
            out.append(f"the v2 rollout ended {self.v2_state}, not rolled_back")
        if self.v2_gates != ["predictions"] or self.v2_wave != 0:
            out.append(f"v2 was stopped by {', '.join(self.v2_gates) or 'no gate'} at wave {self.v2_wave}, not by "
                       "the predictions gate at its canary (wave 0)")
        if len(self.v2_devices) != 1:
            out.append(f"v2 reached {len(self.v2_devices)} devices ({', '.join(self.v2_devices)}), not one canary")
        if self.alerts != [SHIFTED]:
            out.append(f"drift alerts on {', '.join(self.alerts) or 'nobody'}, not on {SHIFTED} alone")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()


def _wait(what: str, fn: Callable[[], Any], timeout: float, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        _check_signal()
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def _pause(seconds: float) -> None:
    """Sleep, as :func:`_wait` does: a signal received meanwhile still stops the demo."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        _check_signal()
        time.sleep(min(left, 0.5))
    _check_signal()


def _count(registry: Any, query: Any) -> int:
    with Session(registry.engine) as db:
        return len(db.exec(query).all())


# -- building ---------------------------------------------------------------------------------------------


def _build_v1(data: Path, console: Console) -> Path:
    from toolchain.bundle import verify_bundle
    from toolchain.pipeline import BuildSpec, build

    out = data / "bundles" / "digits-1.0.0"
    key = data / "keys" / "signing.key"
    if (out / "manifest.json").exists():
        from protocol import load_public_key

        verify_bundle(out, load_public_key((data / "keys" / "signing.pub").read_bytes()))
        console.print(f"  reusing {out} (signature checked)")
        return out
    t0 = time.monotonic()
    with console.status("  training, quantizing, converting and signing digits v1 …"):
        build(BuildSpec(recipe="digits", out=out, key=key, version="1.0.0", author="ml-engineer", epochs=12,
                        tar=False, description="8×8 handwritten digits; the demo's model"))
    console.print(f"  built {out} in {time.monotonic() - t0:.0f} s")
    return out


def _build_v2(data: Path, v1: Path, console: Console) -> Path:
    """v1's fp32 graph behind an inversion of its input (16 − pixel): dark digits on light, as no camera sends."""
    import onnx
    from onnx import helper, numpy_helper

    from toolchain.data import load_digits
    from toolchain.pipeline import BuildSpec, build

    out = data / "bundles" / "digits-2.0.0"
    if (out / "manifest.json").exists():
        console.print(f"  reusing {out}")
        return out
    manifest = json.loads((v1 / "manifest.json").read_text())["manifest"]
    fp32 = next(a for a in manifest["artifacts"] if a["name"] == "digits-onnx-fp32")
    model = onnx.load(str(v1 / "artifacts" / fp32["sha256"]))
    graph = model.graph
    inp = graph.input[0].name
    graph.initializer.append(numpy_helper.from_array(np.array(16.0, dtype=np.float32), "demo_white"))
    node = helper.make_node("Sub", ["demo_white", inp], ["demo_rescaled"], name="demo_broken_preprocessing")
    for n in graph.node:
        n.input[:] = ["demo_rescaled" if i == inp else i for i in n.input]
    graph.node.insert(0, node)
    work = data / "bundles" / ".digits-2.0.0.work"
    work.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(work / "digits-broken.onnx"))
    ds = load_digits()
    np.savez(work / "digits.npz", x=ds.x, y=ds.y)
    t0 = time.monotonic()
    with console.status("  building digits v2 from the altered graph …"):
        build(BuildSpec(recipe="onnx", onnx=work / "digits-broken.onnx", data=work / "digits.npz", name="digits",
                        out=out, key=data / "keys" / "signing.key", version="2.0.0", author="ml-engineer",
                        parent="1.0.0", tar=False, work_dir=work,
                        description="digits v2: a preprocessing step inverts the image"))
    console.print(f"  built {out} in {time.monotonic() - t0:.0f} s")
    return out


# -- agents and traffic -------------------------------------------------------------------------------------


def _hellos(registry: Any) -> dict[str, dict[str, str]] | None:
    """Each demo device's reported runtimes, once every one of them has sent its hello (else None)."""
    from server.assignment import runtimes_of
    from server.db.models import Device

    with Session(registry.engine) as db:
        rows = {d.id: runtimes_of(d.fingerprint) for d in db.exec(select(Device))}
    if any(rows.get(device) is None for device, _ in DEVICES):
        return None
    return {device: rows[device] or {} for device, _ in DEVICES}


def _narrate_runtimes(registry: Any, runtimes: dict[str, dict[str, str]], console: Console) -> None:
    """What each device reported having, and which artifact of v1 that gets it (server/assignment.py)."""
    from server.assignment import choose

    _, signed = registry.model("digits", "1.0.0")
    for device, profile in DEVICES:
        have = runtimes[device]
        choice = choose(signed.manifest, profile, have)
        said = ", ".join(f"{k} {v}" for k, v in sorted(have.items())) or "no runtime"
        gets = choice.artifact or f"nothing ({choice.reason})"
        note = ""
        if profile.startswith("jetson") and "tensorrt" not in have:
            note = " — no TensorRT here (it needs an NVIDIA GPU and JetPack), so not the TensorRT engine"
        console.print(f"  {device:<12} reported {said}: gets {gets}{note}")


# -- the story ------------------------------------------------------------------------------------------------


@dataclass
class _Operators:
    """The demo's operators as the API knows them: a client with each one's token, and the approver's key."""

    clients: dict[str, ApiClient]
    keys: dict[str, Ed25519PrivateKey]


def _operators(app: Any, console: Console) -> _Operators:
    """A token for each demo operator (issued on the server host, as ``edgeherd operator add`` does), and an
    Ed25519 key for the reviewer, registered through the API (``edgeherd operator keygen``)."""
    from hardware.files import atomic_write
    from protocol import generate_signing_key, load_private_key, private_key_to_pem, public_key_to_text
    from server.api.tokens import issue

    ca = app.api.ca_bundle.read_text()
    clients = {}
    with Session(app.registry.engine) as db:
        for name in ("ml-engineer", "reviewer", "ops"):
            token, _ = issue(db, name, created_by="demo", label="edgeherd demo")
            clients[name] = ApiClient(app.api.url, ca, token)
    # the reviewer's key stays in the data directory: a demo run again there signs with the key on record
    stored = app.registry.data / "keys" / "demo-reviewer.key"
    if stored.exists():
        keys = {"reviewer": load_private_key(stored.read_bytes())}
    else:
        keys = {"reviewer": generate_signing_key()}
        atomic_write(stored, private_key_to_pem(keys["reviewer"]), 0o600)
    clients["reviewer"].request("PUT", "/operators/me/key",
                                {"public_key": public_key_to_text(keys["reviewer"].public_key())})
    console.print(f"  operator API on {app.api.url} (HTTPS, the server's CA); tokens for ml-engineer, reviewer "
                  f"and ops; reviewer's signing key registered")
    return _Operators(clients, keys)


def _rollout(ops: _Operators, name: str, ref: str, console: Console) -> None:
    from server.rollouts import Gates, RolloutSpec
    from server.signatures import sign_decision

    reason = "model card and held-out metrics reviewed"
    ops.clients["ml-engineer"].post(f"/models/{ref}/promote")
    card = ops.clients["reviewer"].get(f"/models/{ref}")
    signature = sign_decision(ops.keys["reviewer"], manifest_sha256=card["manifest_sha256"], model=ref,
                              decision="approve", operator="reviewer", reason=reason)
    approved = ops.clients["reviewer"].post(f"/models/{ref}/approve", {"reason": reason, "signature": signature})
    console.print(f"  {ref}: promoted by ml-engineer, approved by reviewer with a signature the server verified "
                  f"(four-eyes; audit #{approved['audit_seq']})")
    spec = RolloutSpec(waves=("1", "50%", "100%"), soak_s=8, install_timeout_s=60, on_failure="rollback",
                       gates=Gates(min_requests=40, error_margin=0.01, latency_margin=3.0, drift_margin=0.34,
                                   min_drift_windows=2))
    ops.clients["ops"].request("POST", "/rollouts", {"name": name, "model": ref, "target": {"groups": [GROUP]},
                                                     "spec": spec.model_dump(mode="json"), "production": True})
    console.print(f"  rollout {name} by ops: waves 1 → 50 % → 100 % of group {GROUP}, soak {spec.soak_s:g} s")


def _v2_outcome(registry: Any, name: str, result: DemoResult) -> None:
    """Which gates failed the rollout, at which wave, and which devices it reached (from the database)."""
    from server.db.models import GateEvaluation, Rollout, RolloutDevice

    with Session(registry.engine) as db:
        row = db.exec(select(Rollout).where(Rollout.name == name)).one()
        failed = db.exec(select(GateEvaluation).where(GateEvaluation.rollout_id == row.id,
                                                      GateEvaluation.verdict == "fail")
                         .order_by(col(GateEvaluation.id))).all()
        result.v2_state = row.state
        result.v2_gates = sorted({g.gate for g in failed})
        result.v2_wave = min((g.wave for g in failed), default=None)
        result.v2_numbers = next((g.numbers for g in failed if g.gate == "predictions"), failed[0].numbers
                                 if failed else {})
        result.v2_devices = sorted(db.exec(select(RolloutDevice.device_id).where(
            RolloutDevice.rollout_id == row.id)).all())


def _watch(registry: Any, name: str, until: set[str], console: Console, timeout: float) -> str:
    from server.db.models import AuditEntry, Rollout

    seen = 0

    def state() -> str | None:
        nonlocal seen
        with Session(registry.engine) as db:
            row = db.exec(select(Rollout).where(Rollout.name == name)).one()
            for e in db.exec(select(AuditEntry).where(AuditEntry.subject == f"rollout:{name}", AuditEntry.seq > seen)
                             .order_by(col(AuditEntry.seq))):
                seen = e.seq
                detail = {k: v for k, v in e.detail.items() if k not in ("gates", "spec")}
                console.print(f"    · {e.action.removeprefix('rollout.')} {json.dumps(detail)[:110]}")
            return row.state if row.state in until else None

    return str(_wait(f"rollout {name} to reach {' or '.join(sorted(until))}", state, timeout))


def _log_to_file(path: Path) -> None:
    """Every log record (the server's, the build's, the libraries') goes to ``path``, none to the terminal,
    where the narrative is: the root logger's console handlers are replaced by one file handler."""
    import logging

    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            root.removeHandler(h)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def run_demo(data: Path, console: Console, *, tui: bool = False) -> DemoResult:
    from server.app import ServerApp
    from server.db.models import Alert, Device, ModelVersion
    from server.keypair import write_key_pair
    from server.presence import online_clause

    t_start = time.monotonic()
    result = DemoResult()
    keys = data / "keys"
    if not (keys / "signing.key").exists():
        write_key_pair(keys)
    (data / "operators.toml").write_text(OPERATORS)
    _log_to_file(data / "logs" / "server.log")
    console.print(f"  logs: {data / 'logs'} (server.log, one file per agent)")

    console.rule("[bold]1. Build: train, quantize, convert, sign")
    v1 = _build_v1(data, console)
    v2 = _build_v2(data, v1, console)

    console.rule("[bold]2. Server, broker and six devices")
    app = ServerApp(data, metrics_port=0, drift_interval=2, rollout_interval=1, api_listen=("127.0.0.1", 0)).start()
    reg = app.registry
    console.print(f"  server up; managed Mosquitto on {reg.broker_url}; registry {data / 'edgeherd.db'}")
    if reg.certificates:
        console.print(f"  devices log in over TLS with a certificate each, from the server's own CA in {data / 'pki'}")
    for bundle in (v1, v2):
        v = reg.push_model(bundle, actor="ml-engineer")
        console.print(f"  pushed {v.name}:{v.version} (signature verified, digest {v.manifest_sha256[:12]}…)")
    agents: list[DemoAgent] = []
    traffic: Traffic | None = None
    try:
        operators = _operators(app, console)
        with stopping(agents):
            start_agents(data, reg, console, agents, DEVICES, GROUP)
            _wait("every agent to connect", lambda: _count(reg, select(Device).where(online_clause()))
                  == len(DEVICES), 120)
            runtimes = _wait("every agent's hello (its runtimes)", lambda: _hellos(reg), 60)
            console.print("  all six agents connected with their own credentials; what they reported:")
            _narrate_runtimes(reg, runtimes, console)
            traffic = Traffic(agents)
            traffic.start()
            console.print("  traffic: batches of 16 digits to every agent's /v1/predict, 4 per second")

            console.rule("[bold]3. v1: approved, then rolled out in canary waves")
            _rollout(operators, "digits-v1", "digits:1.0.0", console)
            result.v1_state = _watch(reg, "digits-v1", {"completed", "rolled_back", "paused"}, console, 300)
            if result.v1_state != "completed":
                raise DemoFailed(f"the v1 rollout ended {result.v1_state} (see `edgeherd rollout show digits-v1` "
                                 "and the audit log)")

            console.rule("[bold]4. v2 (broken preprocessing): its canary is caught and rolled back")
            _rollout(operators, "digits-v2", "digits:2.0.0", console)
            _watch(reg, "digits-v2", {"rolled_back", "completed", "paused"}, console, 300)
            _v2_outcome(reg, "digits-v2", result)
            console.print(f"  v2 reached {', '.join(result.v2_devices)}; the [bold]{', '.join(result.v2_gates)}[/] "
                          f"gate stopped it at wave {result.v2_wave}: {json.dumps(result.v2_numbers)[:160]}")
            v1_digest = next(v.manifest_sha256 for v in reg.models() if v.version == "1.0.0")
            v2_digest = next(v.manifest_sha256 for v in reg.models() if v.version == "2.0.0")
            with Session(reg.engine) as db:
                for a in db.exec(select(Alert).where(Alert.manifest_sha256 == v2_digest)):
                    console.print(f"  {a.kind.replace('_', ' ')} alert on {a.device_id} while it ran v2: "
                                  f"{a.detail.get('reason', a.detail.get('worst', ''))}")
            _wait("every device to run v1 again",
                  lambda: _count(reg, select(Device).where(Device.running_manifest == v1_digest)) == len(DEVICES), 120)

            console.rule(f"[bold]5. Drift: {SHIFTED} starts seeing brighter digits")
            traffic.shifted.add(SHIFTED)
            on_v1 = select(Alert).where(Alert.kind == "drift", Alert.manifest_sha256 == v1_digest, col(Alert.active))
            _wait(f"an input drift alert on {SHIFTED}", lambda: _count(reg, on_v1.where(Alert.device_id == SHIFTED)),
                  120)
            _pause(4)  # a couple more windows for everyone: no other device may get an input drift alert
            with Session(reg.engine) as db:
                result.alerts = sorted({a.device_id or "?" for a in db.exec(on_v1)})
                for a in db.exec(on_v1.where(Alert.device_id == SHIFTED)):
                    console.print(f"  {SHIFTED}: {a.detail.get('reason', a.detail.get('worst', ''))}")
                names = {v.manifest_sha256: f"{v.name}:{v.version}" for v in db.exec(select(ModelVersion))}
                for d in db.exec(select(Device).order_by(col(Device.id))):
                    result.devices[d.id] = {"profile": d.profile, "version": names.get(d.running_manifest or "", "—"),
                                            "artifact": d.running_artifact or "—", "status": d.status}
            console.print(f"  alert raised for {', '.join(result.alerts)}")
            traffic.stop()
            result.seconds = time.monotonic() - t_start
            _summary(result, traffic, console)
            if tui:
                from server.tui.app import make_app

                console.print("opening the TUI as ops (q quits; the demo then stops everything)")
                make_app(data, "ops").run()
    finally:
        if traffic is not None:
            traffic.stop()
        app.stop()
    return result


def _summary(result: DemoResult, traffic: Traffic, console: Console) -> None:
    table = Table(title="edgeherd demo: summary")
    for c in ("device", "profile", "runs", "artifact", "status", "drift alert"):
        table.add_column(c)
    for device, d in result.devices.items():
        table.add_row(device, d["profile"], d["version"], d["artifact"], d["status"],
                      "[red]yes[/]" if device in result.alerts else "no")
    console.print(table)
    everywhere = all(d["version"] == "digits:1.0.0" for d in result.devices.values())
    stopped = (f"v2 rolled back at the canary by the [bold]{result.v2_gate}[/] gate" if result.v2_wave == 0
               else f"v2 {result.v2_state} at wave {result.v2_wave} by {', '.join(result.v2_gates) or 'no gate'}")
    console.print(f"v1 on all devices: {'yes' if everywhere else 'NO'} · {stopped}"
                  f" · drift alert on {', '.join(result.alerts) or 'nobody'} · {traffic.sent} prediction requests"
                  f" · {result.seconds:.0f} s")
    for problem in result.problems():
        console.print(f"[red]not as narrated:[/] {problem}")


def main(data_dir: Path | None, tui: bool) -> int:
    console = Console(highlight=False)
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="edgeherd-demo-")
        data_dir = Path(tmp)
    data_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]edgeherd demo[/] in {data_dir}")
    _signalled.clear()
    previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        result = run_demo(data_dir, console, tui=tui)
    except DemoFailed as exc:
        console.print(f"[red]demo failed:[/] {exc}; logs in {data_dir / 'logs'}")
        return 1
    except (KeyboardInterrupt, _Terminated) as exc:
        console.print(f"stopped{f' by {exc}' if isinstance(exc, _Terminated) else ''}; every process the demo "
                      f"started is stopped")
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + exc.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if tmp is not None and os.environ.get("EDGEHERD_DEMO_KEEP") != "1":
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if result.ok else 1


class _Terminated(Exception):
    """The demo got SIGTERM or SIGHUP: unwind as Ctrl-C does, through every cleanup."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: Signals received, for :func:`_check_signal`.
_signalled: list[int] = []


def _terminated(signum: int, frame: object) -> None:
    """SIGINT, SIGTERM, SIGHUP: unwind through every cleanup. Python runs a handler between any two bytecodes of
    the main thread, so the exception raised here can land in a finaliser or a weakref callback, where it is
    printed and ignored; the signal is kept as well, and the next :func:`_check_signal` raises it again."""
    _signalled.append(signum)
    _check_signal()


def _check_signal() -> None:
    if _signalled:
        if _signalled[-1] == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Terminated(_signalled[-1])
