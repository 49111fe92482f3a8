"""A device written from docs/protocol.md alone, against a real server over a real Mosquitto.

The device reads its identity and broker from the agent configuration the server wrote, builds every
message from the page's field tables (not the ``protocol`` models), parses what it receives with plain
JSON and ``struct`` as the page describes, and verifies the manifest by the page's canonical form. It gets
its bundle as far as the protocol goes: desired state, manifest verified, every chunk, state reports,
telemetry and statistics with their receipt. The server's answers to refused chunk requests, and the
page's by-hand walk-through (§11), are checked against the page too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import ssl
import struct
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlmodel import Session

from server.app import ServerApp
from server.db.models import Device
from tests.protocol_doc import ProtocolDoc, cells, doc_block, section
from tests.server_helpers import server_dir, wait_for

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.integration

DOC = ProtocolDoc.load()
#: §2's topic table: kind -> (qos, retained).
TOPIC_TABLE = {
    c[0].strip("`"): (int(c[2]), c[3] == "yes")
    for c in (cells(r) for r in re.findall(r"^\| `[a-z/]+` \| .*\|$", section(DOC.text, "## 2."), re.M))
}
#: §6: the frame header's layout and magic.
FRAME = re.search(r"Python `struct` format `([^`]+)`", DOC.text).group(1)  # type: ignore[union-attr]
MAGIC = re.search(r"magic `(\w+)`", DOC.text).group(1).encode()  # type: ignore[union-attr]
PREFIX = re.search(r"Every topic of a device is `([^`]+)\{device_id\}/\{kind\}`", DOC.text).group(1)  # type: ignore[union-attr]
#: §4: the seq of a session's last state message, as in the example will.
FINAL_SEQ = next(json.loads(b)["seq"] for b in re.findall(r"^```json DeviceState\n(.*?)^```", DOC.text, re.S | re.M)
                 if '"lost"' in b)


def _now(offset_s: float = 0.0) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=offset_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json(msg: dict[str, Any]) -> bytes:
    """§3: senders emit canonical JSON."""
    return json.dumps(msg, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class DocDevice:
    """An MQTT 5 device client that knows the page and its agent configuration, nothing else."""

    def __init__(self, agent_toml: Path) -> None:
        cfg = tomllib.loads(agent_toml.read_text())
        self.id: str = cfg["device_id"]
        self.server_key: str = cfg["server_key"]
        url = urlsplit(cfg["broker_url"])
        assert url.scheme in ("mqtt", "mqtts") and url.hostname and url.port, cfg["broker_url"]
        self.session = time.time_ns() // 1_000_000  # §4: increases with every connection
        self.seq = 0
        self.inbox: dict[str, queue.Queue[bytes]] = {k: queue.Queue() for k in TOPIC_TABLE}
        self._subacks: queue.Queue[int] = queue.Queue()
        self._connected: queue.Queue[bool] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.id, protocol=mqtt.MQTTv5)  # §1
        if url.scheme == "mqtts":  # §1: its own certificate; only the pinned CA trusted, the host name checked
            ctx = ssl.create_default_context(cafile=str(agent_toml.parent / cfg["tls_ca"]))
            ctx.load_cert_chain(str(agent_toml.parent / cfg["tls_cert"]), str(agent_toml.parent / cfg["tls_key"]))
            self.client.tls_set_context(ctx)
        else:  # a broker the user brings, with passwords
            self.client.username_pw_set(self.id, (agent_toml.parent / cfg["password_file"]).read_text().strip())
        will = DOC.build("DeviceState", device_id=self.id, status="offline", reason="lost", session=self.session,
                         seq=FINAL_SEQ)
        qos, retain = TOPIC_TABLE["state"]
        self.client.will_set(self.topic("state"), _json(will), qos=qos, retain=retain)
        self.client.on_connect = lambda c, u, f, reason, p: self._connected.put(not reason.is_failure)
        self.client.on_subscribe = lambda c, u, mid, reasons, p: self._subacks.put(mid)
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 60
        self.client.connect(url.hostname, url.port, keepalive=30, clean_start=True, properties=props)
        self.client.loop_start()
        assert self._connected.get(timeout=10), "the broker refused the device"
        filters = [f.replace("{device_id}", self.id) for f in re.findall(
            r"^(edgeherd/v1/devices/\{device_id\}/\S+)$", doc_block(DOC.text, "## 2.", ""), re.M)]
        assert len(filters) == 5
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        assert self._subacks.get(timeout=10) == mid

    def topic(self, kind: str) -> str:
        return f"{PREFIX}{self.id}/{kind}"

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        kind = msg.topic[len(PREFIX) + len(self.id) + 1:]
        self.inbox[kind].put(bytes(msg.payload))

    def send(self, kind: str, msg: dict[str, Any] | bytes) -> None:
        qos, retain = TOPIC_TABLE[kind]
        info = self.client.publish(self.topic(kind), msg if isinstance(msg, bytes) else _json(msg), qos=qos,
                                   retain=retain)
        info.wait_for_publish(10)

    def state(self, **fields: Any) -> dict[str, Any]:
        msg = DOC.build("DeviceState", device_id=self.id, status="online", session=self.session, seq=self.seq,
                        ts=_now(), **fields)
        self.seq += 1
        self.send("state", msg)
        return msg

    def receive(self, kind: str, timeout: float = 30.0) -> bytes:
        return self.inbox[kind].get(timeout=timeout)

    def json(self, kind: str, model: str, timeout: float = 30.0) -> dict[str, Any]:
        value = json.loads(self.receive(kind, timeout))
        DOC.check(model, value)
        return value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _verify(server_key: str, bundle: dict[str, Any]) -> bytes:
    """§8: parse by the tables, re-serialise canonically, verify with the pinned key (the agent
    configuration's ``server_key``); the canonical bytes."""
    DOC.check("SignedManifest", bundle)
    prefix, _, b64 = server_key.partition(":")
    assert prefix == "ed25519"
    raw = base64.b64decode(b64)
    assert bundle["signature"]["alg"] == "ed25519"
    assert bundle["signature"]["key_id"] == hashlib.sha256(raw).hexdigest()[:16], "signed by another key"
    canonical = DOC.canonical("Manifest", bundle["manifest"])
    Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(bundle["signature"]["value"]), canonical)
    return canonical


def _frame(payload: bytes) -> tuple[str, str, int, int, bytes]:
    """§6: (request id, artifact sha256, offset, total, data) of a valid frame; AssertionError otherwise."""
    size = struct.calcsize(FRAME)
    magic, rid, sha, offset, total, n, data_sha = struct.unpack(FRAME, payload[:size])
    data = payload[size:]
    assert magic == MAGIC and n == len(data) and offset + n <= total
    assert hashlib.sha256(data).digest() == data_sha
    return rid.hex(), sha.hex(), offset, total, data


# -- the server and its bundle -------------------------------------------------------------------------


def _rich_bundle(root: Path, key: Any) -> tuple[Path, dict[str, bytes]]:
    """A signed bundle whose manifest uses every optional part of the schema: preprocessing, an ONNX opset,
    TensorRT build settings, a confidence histogram and registry features of every transform."""
    from protocol import (
        ArtifactEntry,
        FeatureReference,
        GoldenSet,
        Manifest,
        Precision,
        Preprocessing,
        ReferenceProfile,
        RuntimeRequirement,
        ShapeRange,
        SmokeExpectation,
        Target,
        TensorRTBuild,
        TensorSpec,
        encode_model,
    )
    from protocol.features import FeatureDefinition, FeatureSet
    from protocol.signing import sign_manifest

    blobs = {name: os.urandom(size) for name, size in [("rich-onnx-fp32", 300_000), ("rich-tensorrt-fp16", 5000)]}
    (root / "artifacts").mkdir(parents=True)
    for blob in blobs.values():
        (root / "artifacts" / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    columns = ["a", "b", "c", "s1", "s2", "site"]
    defs = [FeatureDefinition.model_validate(d) for d in [
        {"name": "a_raw", "version": 1, "min": 0.0, "max": 10.0, "transform": {"op": "identity", "column": "a"}},
        {"name": "b_scaled", "version": 2, "min": -3.0, "max": 3.0, "unit": "z", "bins": 4, "owner": "lab",
         "transform": {"op": "scale", "column": "b", "offset": 50.0, "factor": 0.05}},
        {"name": "c_clip", "version": 1, "min": 0.0, "max": 4.0, "on_violation": "warn", "max_out_of_range": 0.1,
         "transform": {"op": "clip", "column": "c", "min": 0.0, "max": 4.0}},
        {"name": "c_log", "version": 1, "min": 0.0, "max": 2.0, "fill": -1.0, "description": "log load",
         "transform": {"op": "log1p", "column": "c"}},
        {"name": "ab_ratio", "version": 1, "min": 0.0, "max": 5.0, "max_missing": 0.01,
         "transform": {"op": "ratio", "numerator": "a", "denominator": "b", "eps": 1e-6}},
        {"name": "site_code", "version": 1, "dtype": "category",
         "transform": {"op": "onehot", "column": "site", "categories": [0, 1, 2], "names": ["x", "y", "z"]}},
        {"name": "s_rms", "version": 1, "min": 0.0, "max": 3.0,
         "transform": {"op": "window", "columns": ["s1", "s2"], "stat": "rms"}},
    ]]
    refs = [FeatureReference(name=d.name, version=d.version, edges=[0.0, 0.5, 1.0, 2.0], counts=[5, 3, 2],
                             mean=0.7, std=0.4) for d in defs]
    tensor = [TensorSpec(name="x", shape=[-1, len(columns)], dtype="float32")]
    out = [TensorSpec(name="logits", shape=[-1, 2], dtype="float32")]
    shas = {name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()}
    manifest = Manifest(
        model="rich", version="1.0.0", created_at=datetime.now(timezone.utc), author="tester",
        description="every optional part of the manifest", task="classification", labels=["no", "yes"],
        artifacts=[
            ArtifactEntry(name="rich-onnx-fp32", target=Target.ONNX, precision=Precision.FP32,
                          sha256=shas["rich-onnx-fp32"], size=len(blobs["rich-onnx-fp32"]),
                          runtime=RuntimeRequirement(name="onnxruntime", min_version="1.17.0", max_version="9.0",
                                                     onnx_opset=17),
                          inputs=tensor, outputs=out, metrics={"accuracy": 0.91, "latency_ms_p50": 0.05},
                          smoke=SmokeExpectation(outputs=[[0.5, -0.5]], atol=0.01, min_agreement=1.0)),
            ArtifactEntry(name="rich-tensorrt-fp16", target=Target.TENSORRT, precision=Precision.FP16,
                          sha256=shas["rich-tensorrt-fp16"], size=len(blobs["rich-tensorrt-fp16"]),
                          runtime=RuntimeRequirement(name="tensorrt", min_version="10.0", onnx_opset=17),
                          inputs=[TensorSpec(name="x", shape=[-1, 6], dtype="int8", scale=0.05, zero_point=-3)],
                          outputs=out,
                          tensorrt=TensorRTBuild(precision=Precision.FP16, workspace_bytes=1 << 28,
                                                 profiles=[ShapeRange(input="x", min=[1, 6], opt=[4, 6],
                                                                      max=[32, 6])],
                                                 compute_capabilities=["8.7"], min_tensorrt="10.0",
                                                 validated_on=["8.7/10.3.0"])),
        ],
        preprocessing=Preprocessing(kind="normalize", mean=[0.0] * 6, std=[1.0] * 6, in_graph=True,
                                    description="standardised in the graph"),
        golden=GoldenSet(inputs=[[0.1, 0.2, 0.3, 0.4, 0.5, 1.0]], labels=[0]),
        reference=ReferenceProfile(kind="features", n=10, features=refs, class_counts=[6, 4],
                                   confidence_edges=[0.0, 0.5, 0.9, 1.0], confidence_counts=[1, 3, 6]),
        features=FeatureSet(inputs=columns, definitions=defs),
        lineage={"recipe": "tabular", "seed": "7", "dataset_sha256": "9e" * 32},
    )
    (root / "manifest.json").write_bytes(encode_model(sign_manifest(manifest, key)))
    return root, blobs


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("doc-device")
    os.chmod(root, 0o711)  # noqa: S103 - the broker, run as the mosquitto user, reaches the data directory below
    data, key = server_dir(root / "server")
    app = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0).start()
    try:
        bundle, blobs = _rich_bundle(root / "bundle", key)
        app.registry.push_model(bundle)
        app.blobs = blobs  # type: ignore[attr-defined]
        yield app
    finally:
        app.stop()


def _device_row(app: ServerApp, device_id: str) -> Device | None:
    with Session(app.registry.engine) as db:
        return db.get(Device, device_id)


def _hello(device: DocDevice, app: ServerApp) -> None:
    """Say hello until the server has stored it (a hello is not retained: one sent before the server has
    subscribed is delivered to nobody)."""
    hello = DOC.build("Hello", device_id=device.id, session=device.session, agent_version="0.1.0", protocols=[1],
                      profile="x86-64-cpu", fingerprint={
                          "arch": "x86_64", "os": "Debian 12", "python": "3.11.2", "cpu_model": "test CPU",
                          "cpu_count": 4, "memory_bytes": 4 << 30, "disk_free_bytes": 10 << 30, "board": "none",
                          "runtimes": {"onnxruntime": "1.20.1"}})

    def stored() -> bool:
        row = _device_row(app, device.id)
        if row is not None and row.fingerprint:
            return True
        device.send("hello", hello)
        return False

    wait_for(stored, 30, "the server to store the hello", poll=1.0)


# -- the whole exchange ----------------------------------------------------------------------------------


def test_a_device_built_from_the_doc_gets_its_bundle(server):
    enrolled = server.registry.add_device("doc-dev", "x86-64-cpu")
    device = DocDevice(enrolled.agent_config)
    try:
        device.state(reason="connected", agent_version="0.1.0")
        _hello(device, server)
        row = _device_row(server, device.id)
        assert row is not None and row.fingerprint["runtimes"] == {"onnxruntime": "1.20.1"}

        server.registry.deploy("rich", "1.0.0", device.id, artifact="rich-onnx-fp32")
        desired = device.json("desired", "DesiredState")
        while "bundle" not in desired:  # "nothing new" states carry no bundle
            desired = device.json("desired", "DesiredState")
        assert desired["device_id"] == device.id and desired["artifact"] == "rich-onnx-fp32"
        manifest = desired["bundle"]["manifest"]
        for part in ("preprocessing", "features"):
            assert part in manifest
        assert "tensorrt" in manifest["artifacts"][1] and "onnx_opset" in manifest["artifacts"][0]["runtime"]
        assert "confidence_edges" in manifest["reference"]

        canonical = _verify(device.server_key, desired["bundle"])
        digest = hashlib.sha256(canonical).hexdigest()
        tampered = json.loads(json.dumps(desired["bundle"]))
        tampered["manifest"]["artifacts"][0]["size"] += 1
        with pytest.raises(InvalidSignature):
            _verify(device.server_key, tampered)
        assert row is not None
        assert _device_row(server, device.id).desired_manifest == digest  # type: ignore[union-attr]

        artifact = next(a for a in manifest["artifacts"] if a["name"] == desired["artifact"])
        install = {"model": manifest["model"], "version": manifest["version"], "manifest_sha256": digest}
        device.state(reason="update", install={**install, "step": "preflight"})

        # every chunk, in requests of 2 chunks, the last clipped at the artifact's end
        data = bytearray(artifact["size"])
        chunk, frames = 65536, 0
        for offset in range(0, artifact["size"], 2 * chunk):
            rid = uuid.uuid4().hex
            device.send("artifact/req", DOC.build("ChunkRequest", request_id=rid, sha256=artifact["sha256"],
                                                  offset=offset, length=2 * chunk, chunk_size=chunk))
            want = math.ceil((min(offset + 2 * chunk, artifact["size"]) - offset) / chunk)
            for _ in range(want):
                got_rid, sha, at, total, part = _frame(device.receive("artifact/chunk"))
                assert (got_rid, sha, total) == (rid, artifact["sha256"], artifact["size"])
                data[at:at + len(part)] = part
                frames += 1
            device.state(reason="update", install={**install, "step": "download", "progress": offset,
                                                   "total": artifact["size"]})
        assert frames == math.ceil(artifact["size"] / chunk)
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
        assert bytes(data) == server.blobs["rich-onnx-fp32"]
        assert device.inbox["error"].empty()

        for step in ("verify", "install", "load", "smoke_test", "switch"):
            device.state(reason="update", install={**install, "step": step})
        device.state(reason="update", install={**install, "step": "done"},
                     running={**{k: install[k] for k in ("model", "version", "manifest_sha256")},
                              "artifact": artifact["name"], "slot": "a"})

        def installed() -> Device | None:
            d = _device_row(server, device.id)
            return d if d is not None and d.install_step == "done" else None

        row = wait_for(installed, 30, "the server to record the install")
        assert (row.status, row.running_manifest, row.running_artifact) == ("online", digest, artifact["name"])
        assert row.state_session == device.session and row.state_seq == device.seq - 1

        # a telemetry window and a statistics window, confirmed by a receipt
        start, end = _now(-60), _now()
        device.send("telemetry", DOC.build(
            "TelemetryWindow", device_id=device.id, session=device.session, window_seq=1, start=start, end=end,
            manifest_sha256=digest, requests=10, errors=1,
            latency_ms={"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0, "mean": 1.5},
            latency_edges_ms=[0.0, 1.0, 5.0], latency_counts=[4, 6], cpu_percent=12.5, memory_bytes=1 << 20,
            disk_free_bytes=1 << 30, temperature_c=40.0, dropped_windows=0))
        features = [{"name": f["name"], "version": f["version"], "counts": [4, 3, 2], "below": 1, "above": 0,
                     "nan": 0, "mean": 0.6, "m2": 1.2, "min": -0.1, "max": 1.9}
                    for f in manifest["reference"]["features"]]
        device.send("stats", DOC.build(
            "FeatureStats", device_id=device.id, session=device.session, window_seq=1, start=start, end=end,
            manifest_sha256=digest, n=10, features=features, class_counts=[6, 4], confidence_counts=[1, 3, 6]))
        confirmed: dict[str, set[tuple[int, int]]] = {"telemetry": set(), "stats": set()}
        while not all(confirmed.values()):
            receipt = device.json("receipt", "Receipt")
            assert receipt["device_id"] == device.id
            for kind in confirmed:
                confirmed[kind] |= {tuple(k) for k in receipt.get(kind, [])}
        assert confirmed == {"telemetry": {(device.session, 1)}, "stats": {(device.session, 1)}}
        assert device.inbox["error"].empty()
    finally:
        device.close()


# -- refused chunk requests: the code the doc names, the request id, a log line and a counter -------------


def _refused(app: ServerApp, reason: str) -> int:
    m = re.search(rf'^edgeherd_server_chunk_requests_refused_total\{{reason="{reason}"\}} (\d+)$',
                  app.metrics_text(), re.M)
    return int(m.group(1)) if m else 0


def _refuse(server: ServerApp, device_id: str, payload: bytes) -> dict[str, Any]:
    enrolled = server.registry.add_device(device_id, "x86-64-cpu")
    device = DocDevice(enrolled.agent_config)
    try:
        _hello(device, server)  # the server is subscribed
        device.send("artifact/req", payload)
        return device.json("error", "ErrorReply")
    finally:
        device.close()


REQ = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def _request(**extra: Any) -> dict[str, Any]:
    return {**DOC.build("ChunkRequest", request_id=REQ, sha256="3f" * 32, offset=0, length=4096), **extra}


def test_another_version_is_answered_unsupported_version(server):
    before = _refused(server, "unsupported_version")
    reply = _refuse(server, "doc-v2", _json(_request(v=2, priority="high")))
    assert reply["code"] == "unsupported_version" and reply["request_id"] == REQ
    assert "1" in reply["message"]
    assert _refused(server, "unsupported_version") == before + 1


def test_a_request_refused_for_an_extra_field_is_answered_with_its_request_id(server):
    reply = _refuse(server, "doc-extra", _json(_request(priority="high")))
    assert reply == {**reply, "code": "bad_request", "request_id": REQ}
    assert "priority" in reply["message"]


def test_every_refused_chunk_request_is_logged_with_the_device_and_counted(server, caplog):
    caplog.set_level(logging.WARNING, logger="server.app")
    before = {r: _refused(server, r) for r in ("not_found", "too_large")}
    reply = _refuse(server, "doc-refused", _json(_request()))  # a valid request for an artifact it may not fetch
    assert reply["code"] == "not_found" and reply["request_id"] == REQ
    reply = _refuse(server, "doc-big", _json(_request(pad="x" * 2000)))
    assert reply["code"] == "too_large" and "request_id" not in reply
    assert {r: _refused(server, r) for r in before} == {r: n + 1 for r, n in before.items()}
    logged = [r.getMessage() for r in caplog.records if r.name == "server.app" and r.levelno == logging.WARNING]
    assert any("doc-refused" in m and "not_found" in m for m in logged), logged
    assert any("doc-big" in m and "too_large" in m for m in logged), logged
    # a topic that names no valid device (only a server user could publish it): nobody to answer, still counted
    bad_topic = _refused(server, "bad_topic")
    server._serve_chunks("edgeherd/v1/devices/Not_A_Device/artifact/req", _json(_request()), time.monotonic())
    assert _refused(server, "bad_topic") == bad_topic + 1


# -- §11, run as written ------------------------------------------------------------------------------------


def test_the_by_hand_walk_through_works_as_written(server, tmp_path):
    for tool in ("mosquitto_pub", "mosquitto_sub", "mosquitto_rr"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; `make test` installs it (apt-get install mosquitto-clients)")
    script = doc_block(DOC.text, "## 11.", "bash")
    script, n = re.subn(r"^DATA=\S+", f"DATA={server.registry.data}", script, count=1, flags=re.M)
    assert n == 1
    server.registry.add_device("dev-a", "x86-64-cpu")
    ready = DocDevice(server.registry.add_device("dev-b", "x86-64-cpu").agent_config)
    _hello(ready, server)  # the server has subscribed: the walk-through's hello will not be lost
    ready.close()
    server.registry.deploy("rich", "1.0.0", "dev-a", artifact="rich-onnx-fp32")
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         check=False)
    out = run.stdout.splitlines()
    assert len(out) == 2, (run.stdout, run.stderr)
    # the desired state, with a bundle that verifies
    desired = json.loads((tmp_path / "desired.json").read_text())
    DOC.check("DesiredState", desired)
    config = tomllib.loads((server.registry.data / "devices" / "dev-a" / "agent.toml").read_text())
    assert desired["artifact"] == "rich-onnx-fp32"
    _verify(config["server_key"], desired["bundle"])
    # one frame of the artifact, in hex
    rid, sha, offset, total, data = _frame(bytes.fromhex(out[0]))
    assert (rid, offset, total) == (REQ, 0, len(server.blobs["rich-onnx-fp32"]))
    assert data == server.blobs["rich-onnx-fp32"][:65536] and sha == hashlib.sha256(server.blobs[
        "rich-onnx-fp32"]).hexdigest()
    # the receipt for the telemetry window
    receipt = json.loads(out[1])
    DOC.check("Receipt", receipt)
    row = _device_row(server, "dev-a")
    assert row is not None and receipt["telemetry"] == [[row.state_session, 1]] and row.state_session > 1
    # the state (its will never fired) and the hello arrived; the publish on another device's topic was refused
    assert (row.status, row.state_seq) == ("online", 0)
    assert row.fingerprint["runtimes"] == {"onnxruntime": "1.20.1"}
    assert "Not authorized" in run.stderr, run.stderr
