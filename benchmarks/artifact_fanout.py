"""A 20 MiB artifact to 50 devices at once, against raw Mosquitto moving the same bytes in the same run.

Baseline: ``mosquitto_pub --repeat`` publishes the artifact as 64 KiB messages
(QoS 1) to one topic that 50 ``mosquitto_sub`` processes receive: the
broker's own fan-out of the same bytes. edgeherd: 50 simulated devices pull
the artifact with the real chunk protocol as the agent does (ranged requests
for missing bytes, two in flight, per-chunk sha256, listening to the
artifact's broadcast topic so a wave shares the chunks) from ``edgeherd
server run``'s answering code, through the same kind of broker. Prints both
aggregate rates and their ratio (target ≥ 0.5).

Run: ``python -m benchmarks.artifact_fanout [--devices 50] [--mib 20]``
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.download import download_slot, missing_ranges
from protocol import (
    ChunkRequest,
    TopicKind,
    artifact_topic,
    decode_chunk,
    device_topic,
    encode,
)
from server.app import ServerApp
from tests.server_helpers import blob_bundle, server_dir

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
          out: mp.Queue, go: Any) -> None:  # type: ignore[type-arg]
    """Devices that fetch like the agent: listen to the broadcast topic, keep two requests for missing bytes."""
    done = threading.Event()
    remaining = [len(creds)]
    lock = threading.Lock()
    clients = []
    chunks = (size + chunk_size - 1) // chunk_size
    shared = artifact_topic(sha)

    def make(device_id: str, password: str) -> None:
        have: set[int] = set()
        inflight: dict[str, tuple[int, int]] = {}  # request id -> offset, length
        finished = [False]
        granted = [0.0]
        slot = download_slot(device_id)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        c.username_pw_set(device_id, password)

        def request() -> None:
            busy = set(inflight.values())
            for off, length in missing_ranges(have, size, chunk_size, busy, 2 - len(inflight), start=slot):
                rid = uuid.uuid4().hex
                inflight[rid] = (off, length)
                c.publish(device_topic(device_id, TopicKind.ARTIFACT_REQUEST), encode(ChunkRequest(
                    request_id=rid, sha256=sha, offset=off, length=length, chunk_size=chunk_size,
                    broadcast=True, listening_ms=int((time.monotonic() - granted[0]) * 1000))), qos=1)

        def on_message(cl: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
            chunk = decode_chunk(bytes(msg.payload))  # checks the chunk's own sha256
            have.add(chunk.offset // chunk_size)
            for rid, (off, length) in list(inflight.items()):
                if all(k in have for k in range(off // chunk_size, (off + length - 1) // chunk_size + 1)):
                    del inflight[rid]
            if len(have) == chunks:
                if not finished[0]:
                    finished[0] = True
                    with lock:
                        remaining[0] -= 1
                        if remaining[0] == 0:
                            done.set()
                return
            request()

        def on_connect(cl: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
            cl.subscribe([(device_topic(device_id, TopicKind.ARTIFACT_CHUNK), 1), (shared, 1)])

        def on_subscribe(cl: mqtt.Client, u: object, mid: int, rc: object, p: object) -> None:
            granted[0] = time.monotonic()
            ready.wait()
            request()

        c.on_message, c.on_connect, c.on_subscribe = on_message, on_connect, on_subscribe
        c.connect(host, port, keepalive=60)
        c.loop_start()
        clients.append(c)

    ready = threading.Event()
    for device_id, password in creds:
        make(device_id, password)
    out.put("connected")
    go.wait(120)  # every device of every process is connected: start together, as a rollout wave does
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
        data, key = server_dir(Path(tmp) / "data")
        bundle, blob, _ = blob_bundle(Path(tmp) / "bundle", key, model="big", size=size)
        sha = hashlib.sha256(blob).hexdigest()
        payload = Path(tmp) / "chunk.bin"
        payload.write_bytes(blob[:CHUNK])

        app = ServerApp(data, metrics_port=0, drift_interval=3600, workers=2).start()
        try:
            reg = app.registry
            reg.push_model(bundle)
            ids = [f"fan-{i:03d}" for i in range(args.devices)]
            passwords = reg.add_devices_bulk(ids, "simulated", custom_profile=True)
            for d in ids:
                reg.deploy("big", "1.0.0", d, "blob")
            raw = _baseline("127.0.0.1", reg.broker.port, "edgeherd-server", reg.broker.server_password(), payload,
                            args.devices, size)
            ctx = mp.get_context("spawn")
            out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
            go = ctx.Event()
            shards = [list(passwords.items())[i::4] for i in range(4)]
            procs = [ctx.Process(target=_pull, args=("127.0.0.1", reg.broker.port, s, sha, size,
                                                     args.chunk_kib * 1024, out, go))
                     for s in shards if s]
            for p in procs:
                p.start()
            for _ in procs:
                out.get(timeout=120)
            t0 = time.monotonic()
            go.set()
            for _ in procs:
                assert out.get(timeout=900) == "done"
            ours = args.devices * size / (time.monotonic() - t0)
            sent = app.chunks_sent * args.chunk_kib * 1024 / size
            for p in procs:
                p.join(30)
        finally:
            app.stop()
    print(f"{args.devices} devices × {args.mib} MiB, {args.chunk_kib} KiB chunks: "
          f"mosquitto_pub/sub {raw / 2**20:7.1f} MiB/s, "
          f"edgeherd chunk protocol {ours / 2**20:7.1f} MiB/s, ratio {ours / raw:.2f} (target ≥ 0.5); "
          f"the server sent the artifact {sent:.1f} times")


if __name__ == "__main__":
    main()
