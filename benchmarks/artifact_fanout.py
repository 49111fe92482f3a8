"""A 20 MiB artifact to 50 devices at once, over the devices' TLS listener and over plain TCP, against raw
Mosquitto moving the same bytes, all in the same run.

Baseline: ``mosquitto_pub --repeat`` publishes the artifact as 64 KiB messages
(QoS 1) to one topic that 50 ``mosquitto_sub`` processes receive (on the
broker's plain loopback listener): the broker's own fan-out of the same
bytes. edgeherd: 50 simulated devices pull the artifact with the real chunk
protocol as the agent does (ranged requests for missing bytes, two in
flight, per-chunk sha256, listening to the artifact's broadcast topic so a
wave shares the chunks) from ``edgeherd server run``'s answering code,
through the same kind of broker.

The cost of TLS: every run pulls the artifact twice, each time from a fresh
server: once as the default has it (the devices' listener speaks TLS 1.2+,
each device logs in with its own certificate, the handshakes done before the
wave starts) and once from a data directory whose ``broker/listener.json``
says ``"tls": false`` before the server first opens it (the same code, its
devices logging in with passwords over plain TCP); the order alternates from
run to run. Each run is a pair: its baseline is measured on the broker of
that run's TLS wave, just before it, and both of the run's waves are divided
by it. Prints each run's rates, then over the runs the median (with the
lowest and highest) of edgeherd / raw (target ≥ 0.8) for both listeners and
of TLS / plain for the wave time. The 50 receiving devices (4 Python
processes), the broker and the server share this machine's cores.

Where the time goes: each wave also reports the CPU seconds, per GiB
delivered, of the receiving devices (their processes' CPU time from the go to
their last byte), of the broker and of the server (this process); the
baseline reports its C clients' and the broker's. The devices check each
frame's sha256 and parse MQTT in Python, which the baseline's
``mosquitto_sub`` does not: when the devices' CPU alone is more than the
cores can give in the baseline's time, the ratio cannot reach 1, whatever the
server does.

Run: ``python -m benchmarks.artifact_fanout [--devices 50] [--mib 20] [--runs 5]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    generate_signing_key,
)
from server.app import ServerApp
from server.broker import SERVER_HOST, DeviceCredentials
from server.simulate import device_tls_context
from tests.server_helpers import blob_bundle, server_dir

CHUNK = 64 * 1024
LISTENERS = ("tls", "plain")
#: Target for edgeherd / mosquitto_pub/sub (median over the runs).
TARGET = 0.8


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (readable for another user's process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    """CPU seconds of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _baseline(host: str, port: int, user: str, password: str, payload: Path, devices: int, total: int,
              broker_pid: int) -> tuple[float, dict[str, float]]:
    """mosquitto_pub/sub's rate (bytes/s, all subscribers together) and the CPU seconds its clients and the broker
    used."""
    topic = f"edgeherd/v1/bench/{uuid.uuid4().hex}"  # inside the server user's ACL
    count = total // CHUNK
    subs = [subprocess.Popen(["mosquitto_sub", "-h", host, "-p", str(port), "-u", user, "-P", password,  # noqa: S607
                              "-q", "1", "-t", topic, "-C", str(count), "-V", "mqttv5"], stdout=subprocess.DEVNULL)
            for _ in range(devices)]
    time.sleep(1.5)
    clients, broker = _children_cpu(), _cpu_of(broker_pid)
    t0 = time.monotonic()
    subprocess.run(["mosquitto_pub", "-h", host, "-p", str(port), "-u", user, "-P", password, "-q", "1",  # noqa: S607
                    "-t", topic, "-f", str(payload), "--repeat", str(count), "-V", "mqttv5"], check=True)
    for s in subs:
        s.wait(600)
    seconds = time.monotonic() - t0
    cpu = {"clients": _children_cpu() - clients, "broker": _cpu_of(broker_pid) - broker}
    return devices * count * CHUNK / seconds, cpu


def _pull(url: str, creds: list[tuple[str, DeviceCredentials]], sha: str, size: int, chunk_size: int,
          out: mp.Queue, go: Any) -> None:  # type: ignore[type-arg]
    """Devices that fetch like the agent: listen to the broadcast topic, keep two requests for missing bytes.
    On ``mqtts://`` each logs in with its certificate, the broker checked against its CA bundle and the URL's
    host (TLS contexts are made here: they cannot cross processes)."""
    done = threading.Event()
    remaining = [len(creds)]
    subscribed = [0]
    all_subscribed = threading.Event()
    lock = threading.Lock()
    clients = []
    chunks = (size + chunk_size - 1) // chunk_size
    shared = artifact_topic(sha)
    parts = urlsplit(url)
    host, port = parts.hostname or SERVER_HOST, parts.port or 1883
    contexts = {}
    if parts.scheme == "mqtts":
        with tempfile.TemporaryDirectory(prefix="edgeherd-bench-") as scratch:  # the keys' files, while loaded
            contexts = {d: device_tls_context(c, Path(scratch)) for d, c in creds}

    def make(device_id: str, password: str | None) -> None:
        have: set[int] = set()
        inflight: dict[str, tuple[int, int]] = {}  # request id -> offset, length
        finished = [False]
        granted = [0.0]
        slot = download_slot(device_id)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        c.username_pw_set(device_id, password)
        if device_id in contexts:
            c.tls_set_context(contexts[device_id])

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
            with lock:
                subscribed[0] += 1
                if subscribed[0] == len(creds):
                    all_subscribed.set()
            ready.wait()
            request()

        c.on_message, c.on_connect, c.on_subscribe = on_message, on_connect, on_subscribe
        c.connect(host, port, keepalive=60)  # on TLS the handshake runs here, before the wave
        c.loop_start()
        clients.append(c)

    ready = threading.Event()
    for device_id, login in creds:
        make(device_id, login.password)
    if not all_subscribed.wait(120):
        raise RuntimeError(f"only {subscribed[0]} of {len(creds)} devices logged in and subscribed at {url}")
    out.put("connected")
    go.wait(120)  # every device of every process is connected: start together, as a rollout wave does
    cpu = time.process_time()
    ready.set()
    done.wait(600)
    out.put(("done", time.process_time() - cpu))
    for c in clients:
        c.disconnect()
        c.loop_stop()


def _wave(root: Path, key: Any, bundle: Path, sha: str, listener: str, devices: int, size: int, chunk: int,
          payload: Path | None) -> tuple[float, float, dict[str, float], tuple[float, dict[str, float]] | None]:
    """One wave from a fresh server on a data directory under ``root``: (seconds from the go to the last byte,
    times the server sent the artifact, CPU seconds of the devices, the broker and the server during the wave,
    mosquitto_pub/sub's rate and CPU seconds on its broker when ``payload`` is given)."""
    data, _ = server_dir(root / f"{listener}-{uuid.uuid4().hex[:8]}" / "data", key)
    if listener == "plain":  # before the server first opens it: the broker keeps a "tls" it finds
        (data / "broker").mkdir(mode=0o700)
        (data / "broker" / "listener.json").write_text(json.dumps({"tls": False}))
    app = ServerApp(data, metrics_port=0, drift_interval=3600, workers=2).start()
    try:
        reg = app.registry
        assert reg.certificates == (listener == "tls"), reg.broker_url  # what is measured
        reg.push_model(bundle)
        ids = [f"fan-{i:03d}" for i in range(devices)]
        creds = reg.add_devices_bulk(ids, "simulated", custom_profile=True)
        for d in ids:
            reg.deploy("big", "1.0.0", d, "blob")
        assert reg.broker.proc is not None  # the managed broker, started with the server
        broker_pid = reg.broker.proc.pid
        raw = None
        if payload is not None:  # the broker's own fan-out, on its plain listener for the server's processes
            raw = _baseline(SERVER_HOST, reg.broker.server_port, "edgeherd-server", reg.broker.server_password(),
                            payload, devices, size, broker_pid)
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        go = ctx.Event()
        shards = [list(creds.items())[i::4] for i in range(4)]
        procs = [ctx.Process(target=_pull, args=(reg.broker_url, s, sha, size, chunk, out, go)) for s in shards if s]
        for p in procs:
            p.start()
        for _ in procs:
            out.get(timeout=180)
        broker, server = _cpu_of(broker_pid), time.process_time()
        t0 = time.monotonic()
        go.set()
        device_cpu = 0.0
        for _ in procs:
            what, cpu = out.get(timeout=900)
            assert what == "done"
            device_cpu += cpu
        seconds = time.monotonic() - t0
        used = {"devices": device_cpu, "broker": _cpu_of(broker_pid) - broker, "server": time.process_time() - server}
        sent = app.chunks_sent * chunk / size
        for p in procs:
            p.join(30)
    finally:
        app.stop()
    return seconds, sent, used, raw


def _median(values: list[float]) -> str:
    """The median, with the lowest and highest."""
    v = sorted(values)
    return f"{statistics.median(v):.2f} ({v[0]:.2f}–{v[-1]:.2f})"


def _per_gib(cpu: dict[str, float], gib: float) -> str:
    return ", ".join(f"{k} {v / gib:.2f}" for k, v in cpu.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--mib", type=int, default=20)
    ap.add_argument("--chunk-kib", type=int, default=256, help="chunk size the devices ask for (4-256)")
    ap.add_argument("--runs", type=int, default=5, help="waves per listener (TLS and plain TCP)")
    args = ap.parse_args()
    size = args.mib * 1024 * 1024
    chunk = args.chunk_kib * 1024
    moved = args.devices * size / 2**20  # MiB per wave, all devices together
    print(f"{args.devices} devices × {args.mib} MiB, {args.chunk_kib} KiB chunks; the devices (4 processes), the "
          f"broker and the server share this machine's {os.cpu_count()} cores", flush=True)
    waves: dict[str, list[float]] = {name: [] for name in LISTENERS}
    cpus: dict[str, list[dict[str, float]]] = {name: [] for name in (*LISTENERS, "raw")}
    raws: list[float] = []
    gib = moved / 1024
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o711)  # noqa: S103 - search only: the broker, run as its own user, reads its files below
        root = Path(tmp)
        key = generate_signing_key()
        bundle, blob, _ = blob_bundle(root / "bundle", key, model="big", size=size)
        sha = hashlib.sha256(blob).hexdigest()
        payload = root / "chunk.bin"
        payload.write_bytes(blob[:CHUNK])
        for i in range(args.runs):
            line = []
            for listener in (LISTENERS if i % 2 == 0 else LISTENERS[::-1]):
                seconds, sent, used, raw = _wave(root, key, bundle, sha, listener, args.devices, size, chunk,
                                                 payload if listener == "tls" else None)
                waves[listener].append(seconds)
                cpus[listener].append(used)
                if raw is not None:
                    raws.append(raw[0])
                    cpus["raw"].append(raw[1])
                line.append(f"{'TLS' if listener == 'tls' else 'plain TCP'} {moved / seconds:7.1f} MiB/s "
                            f"(wave {seconds:5.2f} s, artifact sent {sent:.1f} times; CPU s/GiB {_per_gib(used, gib)})")
            print(f"run {i + 1}: mosquitto_pub/sub {raws[-1] / 2**20:7.1f} MiB/s (CPU s/GiB "
                  f"{_per_gib(cpus['raw'][-1], gib)}); edgeherd chunk protocol over " + ", over ".join(line),
                  flush=True)
    tls, plain = waves["tls"], waves["plain"]
    print(f"over {args.runs} paired run(s), median (lowest–highest): edgeherd / mosquitto_pub/sub: over TLS "
          f"{_median([moved * 2**20 / s / r for s, r in zip(tls, raws, strict=True)])}, over plain TCP "
          f"{_median([moved * 2**20 / s / r for s, r in zip(plain, raws, strict=True)])} (target ≥ {TARGET}); "
          f"TLS / plain wave time {_median([t / p for t, p in zip(tls, plain, strict=True)])}")
    cores = os.cpu_count() or 1
    for name, title in (("raw", "mosquitto_pub/sub"), ("plain", "edgeherd plain TCP"), ("tls", "edgeherd TLS")):
        med = {k: statistics.median(c[k] for c in cpus[name]) for k in cpus[name][0]}
        print(f"CPU s per GiB delivered, median: {title}: {_per_gib(med, gib)}")
    # CPU per GiB delivered, every party together: the baseline's against edgeherd's, and the devices' share
    raw_all = statistics.median(sum(c.values()) for c in cpus["raw"])
    ours_all = statistics.median(sum(c.values()) for c in cpus["plain"])
    share = statistics.median(c["devices"] / sum(c.values()) for c in cpus["plain"])
    print(f"over plain TCP edgeherd's wave used {ours_all / raw_all:.1f} × the CPU of mosquitto_pub/sub's per byte "
          f"delivered ({ours_all / gib:.2f} against {raw_all / gib:.2f} s/GiB), {share:.0%} of it in the receiving "
          f"devices (MQTT parsing and a sha256 per frame, in Python, as the agent does); with {cores} cores shared "
          f"by all, that bounds the ratio where the baseline is CPU-bound")


if __name__ == "__main__":
    main()
