"""The artifact policy on a real server and broker: ``deploy`` before a device has said which runtimes it has
waits for its hello, then sends what its profile and runtimes call for; a bundle it cannot load is refused."""

from __future__ import annotations

import queue
import uuid
from datetime import datetime, timezone
from urllib.parse import urlsplit

import pytest
import tomllib
from sqlmodel import Session

from protocol import DesiredState, Fingerprint, Hello, Precision, Target, TopicKind, decode, device_topic, encode
from server.app import ServerApp
from server.db.models import Device
from server.registry import RegistryError
from tests._mosquitto import DeviceTls
from tests.mqtt_helpers import TestClient
from tests.server_helpers import blob_bundle, server_dir, wait_for
from tests.tls_device_helpers import listeners, reachable

pytestmark = pytest.mark.integration

ARTIFACTS = [("multi-onnx-int8", Target.ONNX, Precision.INT8, "onnxruntime", "1.17"),
             ("multi-tflite-int8", Target.TFLITE, Precision.INT8, "ai-edge-litert", "1.2"),
             ("multi-tensorrt-int8", Target.TENSORRT, Precision.INT8, "tensorrt", "10.0")]


class _Device:
    """A device as the broker sees it: its own credentials, its own topics."""

    def __init__(self, app: ServerApp, device_id: str, config_path) -> None:
        cfg = tomllib.loads(config_path.read_text())
        url = urlsplit(cfg["broker_url"])
        assert url.scheme == "mqtts" and url.port == app.registry.broker.port
        files = config_path.parent
        creds = DeviceTls(device_id, files / cfg["tls_cert"], files / cfg["tls_key"], files / cfg["tls_ca"], 0)
        self.id = device_id
        self.client = TestClient(listeners(app.registry.broker), device_id, creds)  # type: ignore[arg-type]
        self.client.subscribe(device_topic(device_id, TopicKind.DESIRED))

    def hello(self, runtimes: dict[str, str]) -> None:
        fp = Fingerprint(arch="aarch64", os="Linux", python="3.11.7", cpu_count=4, memory_bytes=8 << 30,
                         disk_free_bytes=32 << 30, runtimes=runtimes)
        msg = Hello(device_id=self.id, session=1, agent_version="1.0.0", protocols=[1], fingerprint=fp)
        assert not self.client.publish(device_topic(self.id, TopicKind.HELLO), encode(msg)).is_failure

    def desired(self, timeout: float = 10.0) -> DesiredState:
        return decode(DesiredState, self.client.get(timeout).payload)


@pytest.fixture
def served(tmp_path):
    data, key = server_dir(reachable(tmp_path) / "server")
    bundle, _, _ = blob_bundle(tmp_path / "bundle", key, model="multi", artifacts=ARTIFACTS)
    app = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0).start()
    devices: list[_Device] = []
    try:
        app.registry.push_model(bundle)

        def enrol(device_id: str, profile: str) -> _Device:
            enrolled = app.registry.add_device(device_id, profile)
            devices.append(_Device(app, device_id, enrolled.agent_config))
            return devices[-1]

        yield app, enrol
    finally:
        for d in devices:
            d.client.close()
        app.stop()


def _row(app: ServerApp, device_id: str) -> Device:
    with Session(app.registry.engine) as db:
        row = db.get(Device, device_id)
        assert row is not None
        return row


def test_deploy_before_the_hello_waits_for_it_then_sends_what_the_runtimes_allow(served):
    app, enrol = served
    pi = enrol("pi-1", "raspberry-pi-5")
    assert app.registry.deploy("multi", "1.0.0", "pi-1") is None  # not heard from: nothing is guessed
    row = _row(app, "pi-1")
    assert row.desired_manifest is not None and row.desired_artifact is None
    with pytest.raises(queue.Empty):  # nothing was published
        pi.client.get(1.0)
    pi.hello({"ai-edge-litert": "2.3.0"})  # a Pi flashed with LiteRT only
    desired = pi.desired()
    assert desired.artifact == "multi-tflite-int8" and desired.device_id == "pi-1"
    assert wait_for(lambda: _row(app, "pi-1").desired_artifact == "multi-tflite-int8", 10, "the row to say so")


def test_a_jetson_without_tensorrt_is_sent_the_onnx_artifact_and_never_the_engine(served):
    app, enrol = served
    jetson = enrol("jetson-1", "jetson-orin-nano")
    jetson.hello({"onnxruntime": "1.20.1"})
    wait_for(lambda: _row(app, "jetson-1").fingerprint, 10, "the hello to be stored")
    desired = app.registry.deploy("multi", "1.0.0", "jetson-1")
    assert desired is not None and desired.artifact == "multi-onnx-int8"
    assert jetson.desired().artifact == "multi-onnx-int8"
    generation = _row(app, "jetson-1").desired_generation
    with pytest.raises(RegistryError, match=r"jetson-1 cannot load multi:1.0.0 multi-tensorrt-int8: it needs "
                                            r"tensorrt >= 10.0, which is not installed"):
        app.registry.deploy("multi", "1.0.0", "jetson-1", "multi-tensorrt-int8")
    assert _row(app, "jetson-1").desired_generation == generation  # refused: nothing changed


def test_a_bundle_the_device_cannot_load_is_refused_with_what_it_has_and_what_it_reported(served):
    app, enrol = served
    pi = enrol("pi-2", "raspberry-pi-4")
    pi.hello({"onnxruntime": "1.20.1"})
    wait_for(lambda: _row(app, "pi-2").fingerprint, 10, "the hello to be stored")
    with pytest.raises(RegistryError, match=r"no artifact of multi:1.0.0 suits it: the bundle has multi-onnx-int8, "
                                            r"multi-tflite-int8, multi-tensorrt-int8.*reported onnxruntime 1.20.1"):
        app.registry.deploy("multi", "1.0.0", "pi-2")
    assert _row(app, "pi-2").desired_manifest is None


def test_a_rollout_waits_for_a_device_that_has_not_said_hello_and_gives_it_the_right_artifact(served):
    """The demo's flake: a Jetson assigned before its hello was stored was sent the TensorRT engine."""
    from server.orchestrator import create_rollout
    from server.rollouts import RolloutSpec

    app, enrol = served
    jetson = enrol("jetson-2", "jetson-orin-nano")
    create_rollout(app.registry, name=f"r-{uuid.uuid4().hex[:6]}", model="multi", version="1.0.0",
                   target={"devices": ["jetson-2"]}, spec=RolloutSpec(strategy="all-at-once"), actor="test")
    app.orchestrator.step()
    row = _row(app, "jetson-2")
    assert row.desired_manifest is not None and row.desired_artifact is None  # assigned, waiting
    with pytest.raises(queue.Empty):
        jetson.client.get(1.0)
    jetson.hello({"onnxruntime": "1.20.1", "tensorrt": "8.6.2"})  # TensorRT too old for the engine
    desired = jetson.desired()
    assert desired.artifact == "multi-onnx-int8" and desired.rollout_id is not None
    assert desired.issued_at <= datetime.now(timezone.utc)
