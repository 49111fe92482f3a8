"""A 20 MiB artifact to 50 devices at once, against raw Mosquitto moving the same bytes in the same run.

Baseline: ``mosquitto_pub --repeat`` publishes the artifact as 64 KiB messages
(QoS 1) to one topic that 50 ``mosquitto_sub`` processes receive: the
broker's own fan-out of the same bytes. edgeherd: 50 simulated devices pull
the artifact with the real chunk protocol (ranged requests, two in flight,
per-chunk sha256) from ``edgeherd server run``'s answering code, through the
same kind of broker. Prints both aggregate rates and their ratio (target ≥ 0.5).

Run: ``python -m benchmarks.artifact_fanout [--devices 50] [--mib 20]``
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import subprocess
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import (
    ArtifactEntry,
    ChunkRequest,
    Manifest,
    Precision,
    RuntimeRequirement,
    Target,
    TensorSpec,
    TopicKind,
    decode_chunk,
    device_topic,
    encode,
    generate_signing_key,
    private_key_to_pem,
    public_key_to_pem,
)
from protocol._model import encode_model
from protocol.signing import sign_manifest
from server.app import ServerApp

CHUNK = 64 * 1024


def _baseline(host: str, port: int, user: str, password: str, payload: Path, devices: int, total: int) -> float:
    topic = f"edgeherd/v1/bench/{uuid.uuid4().hex}"  # inside the server user's ACL
    count = total // CHUNK
    subs = [subprocess.Popen(["mosquitto_sub", "-h", host, "-p", str(port), "-u", user, "-P", password,  # noqa: S607
                              "-q", "1", "-t", topic, "-C", str(count), "-V", "mqttv5"], stdout=subprocess.DEVNULL)
            for _ in range(devices)]
    time.sleep(1.5)
    t0 = time.monotonic()
    subprocess.run(["mosquitto_pub", "-h", host, "-p", str(port), "-u", user, "-P", password, "-q", "1",  # noqa: S607
                    "-t", topic, "-f", str(payload), "--repeat", str(count), "-V", "mqttv5"], check=True)
    for s in subs:
        s.wait(600)
    return devices * count * CHUNK / (time.monotonic() - t0)


def _pull(host: str, port: int, creds: list[tuple[str, str]], sha: str, size: int, chunk_size: int,
          out: mp.Queue) -> None:  # type: ignore[type-arg]
    done = threading.Event()
    remaining = [len(creds)]
    lock = threading.Lock()
    clients = []

    def make(device_id: str, password: str) -> None:
        have: set[int] = set()
        inflight: dict[str, int] = {}
        next_off = [0]
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        c.username_pw_set(device_id, password)

        def request() -> None:
            while len(inflight) < 2 and next_off[0] < size:
                rid = uuid.uuid4().hex
                length = min(1024 * 1024, size - next_off[0])
                inflight[rid] = length
                c.publish(device_topic(device_id, TopicKind.ARTIFACT_REQUEST), encode(ChunkRequest(
                    request_id=rid, sha256=sha, offset=next_off[0], length=length, chunk_size=chunk_size)), qos=1)
                next_off[0] += length

        def on_message(cl: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
            chunk = decode_chunk(bytes(msg.payload))  # checks the chunk's own sha256
            have.add(chunk.offset)
            inflight[chunk.request_id] -= len(chunk.data)
            if inflight[chunk.request_id] <= 0:
                del inflight[chunk.request_id]
                request()
            if len(have) * chunk_size >= size:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        def on_connect(cl: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
            cl.subscribe(device_topic(device_id, TopicKind.ARTIFACT_CHUNK), qos=1)

        c.on_message, c.on_connect = on_message, on_connect
        def on_subscribe(cl: mqtt.Client, u: object, mid: int, rc: object, p: object) -> None:
            ready.wait()
            request()

        c.on_subscribe = on_subscribe
        c.connect(host, port, keepalive=60)
        c.loop_start()
        clients.append(c)

    ready = threading.Event()
    for device_id, password in creds:
        make(device_id, password)
    out.put("connected")
    ready.set()
    done.wait(600)
    out.put("done")
    for c in clients:
        c.disconnect()
        c.loop_stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--mib", type=int, default=20)
    ap.add_argument("--chunk-kib", type=int, default=256, help="chunk size the devices ask for (4-256)")
    args = ap.parse_args()
    size = args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        key = generate_signing_key()
        (data / "keys").mkdir(parents=True)
        (data / "keys" / "signing.key").write_bytes(private_key_to_pem(key))
        (data / "keys" / "signing.pub").write_bytes(public_key_to_pem(key.public_key()))
        blob = os.urandom(size)
        sha = hashlib.sha256(blob).hexdigest()
        bundle = Path(tmp) / "bundle"
        (bundle / "artifacts").mkdir(parents=True)
        (bundle / "artifacts" / sha).write_bytes(blob)
        art = ArtifactEntry(name="big", target=Target.ONNX, precision=Precision.FP32, sha256=sha, size=size,
                            runtime=RuntimeRequirement(name="onnxruntime", min_version="1.17"),
                            inputs=[TensorSpec(name="x", shape=[-1, 1], dtype="float32")],
                            outputs=[TensorSpec(name="y", shape=[-1, 1], dtype="float32")])
        m = Manifest(model="big", version="1.0.0", created_at=datetime.now(timezone.utc), task="classification",
                     artifacts=[art])
        (bundle / "manifest.json").write_bytes(encode_model(sign_manifest(m, key)))
        payload = Path(tmp) / "chunk.bin"
        payload.write_bytes(blob[:CHUNK])

        app = ServerApp(data, metrics_port=0, drift_interval=3600, workers=2).start()
        try:
            reg = app.registry
            reg.push_model(bundle)
            ids = [f"fan-{i:03d}" for i in range(args.devices)]
            passwords = reg.add_devices_bulk(ids, "simulated")
            for d in ids:
                reg.deploy("big", "1.0.0", d, "big")
            raw = _baseline("127.0.0.1", reg.broker.port, "edgeherd-server", reg.broker.server_password(), payload,
                            args.devices, size)
            ctx = mp.get_context("spawn")
            out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
            shards = [list(passwords.items())[i::4] for i in range(4)]
            procs = [ctx.Process(target=_pull, args=("127.0.0.1", reg.broker.port, s, sha, size,
                                                     args.chunk_kib * 1024, out))
                     for s in shards if s]
            for p in procs:
                p.start()
            for _ in procs:
                out.get(timeout=120)
            t0 = time.monotonic()
            for _ in procs:
                assert out.get(timeout=900) == "done"
            ours = args.devices * size / (time.monotonic() - t0)
            for p in procs:
                p.join(30)
        finally:
            app.stop()
    print(f"{args.devices} devices × {args.mib} MiB, {args.chunk_kib} KiB chunks: "
          f"mosquitto_pub/sub {raw / 2**20:7.1f} MiB/s, "
          f"edgeherd chunk protocol {ours / 2**20:7.1f} MiB/s, ratio {ours / raw:.2f} (target ≥ 0.5)")


if __name__ == "__main__":
    main()
