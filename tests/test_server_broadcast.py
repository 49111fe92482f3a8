"""Artifact chunks shared on the broadcast topic: a rollout wave's devices fetch the bytes once between them."""

from __future__ import annotations

import hashlib
import os

import pytest

from agent.download import download_slot, missing_ranges
from protocol import (
    ChunkRequest,
    ErrorReply,
    TopicKind,
    artifact_topic,
    decode,
    decode_chunk,
    device_topic,
    encode,
    parse_artifact_topic,
)
from protocol.errors import TopicError
from server.app import ServerApp
from server.distribution import BroadcastLedger, Route
from tests.mqtt_helpers import TestClient
from tests.server_helpers import blob_bundle, server_dir
from tests.tls_device_helpers import device_tls, listeners, reachable

CHUNK = 16 * 1024
SHA = "ab" * 32


# -- the ledger ----------------------------------------------------------------------------------


def test_a_chunk_broadcast_after_a_device_listens_is_not_sent_again_for_it():
    ledger = BroadcastLedger(window=10.0)
    assert ledger.route(SHA, 0, CHUNK, since=101.0, now=102.0) is Route.SHARED  # a asks first: broadcast
    assert ledger.route(SHA, 0, CHUNK, since=100.0, now=103.0) is Route.SKIP  # b listened before it went


def test_a_device_that_started_listening_after_a_broadcast_gets_the_chunk_to_itself():
    ledger = BroadcastLedger(window=10.0)
    assert ledger.route(SHA, 0, CHUNK, since=1.0, now=2.0) is Route.SHARED
    assert ledger.route(SHA, 0, CHUNK, since=3.0, now=4.0) is Route.DIRECT  # the wave does not get it twice
    assert ledger.route(SHA, 0, CHUNK, since=1.5, now=4.5) is Route.SKIP  # the broadcast is still the one of t=2


def test_an_old_broadcast_is_sent_again_so_a_lost_chunk_is_recovered():
    ledger = BroadcastLedger(window=10.0)
    assert ledger.route(SHA, 0, CHUNK, since=0.0, now=1.0) is Route.SHARED
    assert ledger.route(SHA, 0, CHUNK, since=0.0, now=10.9) is Route.SKIP
    assert ledger.route(SHA, 0, CHUNK, since=0.0, now=11.5) is Route.SHARED


def test_other_chunks_artifacts_and_sizes_are_distinct():
    ledger = BroadcastLedger()
    for key in ((SHA, 0, CHUNK), (SHA, CHUNK, CHUNK), ("cd" * 32, 0, CHUNK), (SHA, 0, CHUNK // 2)):
        assert ledger.route(*key, since=0.0, now=1.0) is Route.SHARED
    assert ledger.route(SHA, 0, CHUNK, since=0.0, now=1.5) is Route.SKIP


def test_the_ledger_stays_bounded():
    ledger = BroadcastLedger(window=10.0, max_entries=100)
    for i in range(1000):
        ledger.route(SHA, i * CHUNK, CHUNK, since=0.0, now=float(i))
    assert len(ledger._sent) <= 100


def test_devices_of_a_wave_start_at_different_slots_and_each_still_asks_for_every_missing_byte():
    size, chunk = 10 * 1024 * 1024 + 5, 256 * 1024  # 41 chunks, 11 request slots of 4 chunks
    starts = {missing_ranges(set(), size, chunk, set(), 1, start=download_slot(f"pi-{i}"))[0][0] for i in range(50)}
    assert len(starts) >= 8  # spread over the artifact
    have: set[int] = set()
    asked = []
    while True:
        got = missing_ranges(have, size, chunk, set(), 2, start=7)
        if not got:
            break
        asked += got
        for off, n in got:
            have.update(range(off // chunk, (off + n - 1) // chunk + 1))
    assert asked[0][0] == 7 * 4 * chunk and sum(n for _, n in asked) == size and len(have) == 41
    assert all(n <= 1024 * 1024 for _, n in asked)


def test_artifact_topics_round_trip_and_reject_anything_else():
    assert parse_artifact_topic(artifact_topic(SHA)) == SHA
    assert artifact_topic(SHA) == f"edgeherd/v1/artifacts/{SHA}/chunk"
    for bad in ("edgeherd/v1/artifacts/+/chunk", f"edgeherd/v1/artifacts/{SHA}/x", f"edgeherd/v1/devices/{SHA}/chunk",
                f"edgeherd/v1/artifacts/{SHA.upper()}/chunk"):
        assert parse_artifact_topic(bad) is None
    with pytest.raises(TopicError):
        artifact_topic("../../etc")


# -- on a real broker, with the server -----------------------------------------------------------


@pytest.fixture
def served(tmp_path):
    """A server holding one 20-chunk artifact deployed to devices a, b and c (d has nothing deployed)."""
    data, key = server_dir(reachable(tmp_path) / "server")
    bundle, blob, _ = blob_bundle(tmp_path / "bundle", key, size=20 * CHUNK)
    sha = hashlib.sha256(blob).hexdigest()
    apps: list[ServerApp] = []
    clients: list[TestClient] = []

    def start(broadcast: bool = True):
        app = ServerApp(data, metrics_port=0, drift_interval=0, broadcast=broadcast, broadcast_chunk=CHUNK).start()
        apps.append(app)
        reg = app.registry
        reg.push_model(bundle)
        creds = reg.add_devices_bulk(["a", "b", "c", "d"], "x86-64", custom_profile=True)  # certificates: TLS
        for d in ("a", "b", "c"):
            reg.deploy("blob", "1.0.0", d, "blob")

        def connect(device: str, listen: bool) -> TestClient:
            c = TestClient(listeners(reg.broker), device,  # type: ignore[arg-type]
                           device_tls(device, creds[device], tmp_path / "devices"))
            clients.append(c)
            c.subscribe(device_topic(device, TopicKind.ARTIFACT_CHUNK))
            c.subscribe(device_topic(device, TopicKind.ERROR))
            if listen:
                c.subscribe(artifact_topic(sha))
            return c

        return app, connect

    yield start, blob, sha
    for c in clients:
        c.close()
    for app in apps:
        app.stop()


def _ask(c: TestClient, device: str, sha: str, offset: int, length: int, broadcast: bool,
         listening_ms: int = 0) -> None:
    c.publish(device_topic(device, TopicKind.ARTIFACT_REQUEST), encode(ChunkRequest(
        request_id=os.urandom(16).hex(), sha256=sha, offset=offset, length=length, chunk_size=CHUNK,
        broadcast=broadcast, listening_ms=listening_ms)))


def _frames(c: TestClient, count: int, timeout: float = 20.0) -> list:
    return [(m.topic, decode_chunk(m.payload)) for m in (c.get(timeout) for _ in range(count))]


@pytest.mark.integration
def test_a_wave_shares_broadcast_chunks_and_each_device_still_gets_every_byte(served):
    start, blob, sha = served
    app, connect = start()
    a, b, c = connect("a", True), connect("b", True), connect("c", False)

    _ask(b, "b", sha, 0, CHUNK, True)  # never sent yet: broadcast, so a (listening) gets it too
    assert [f.offset for _, f in _frames(b, 1)] == [0]
    # a has listened for a minute and asks for everything: chunk 0 reached it already, the rest is broadcast
    _ask(a, "a", sha, 0, len(blob), True, listening_ms=60_000)
    got_a = _frames(a, 20)
    assert {t for t, _ in got_a} == {artifact_topic(sha)} and sorted(f.offset for _, f in got_a) == [
        i * CHUNK for i in range(20)]
    got_b = _frames(b, 19)  # b, listening, sees all of it without asking
    _ask(b, "b", sha, 0, len(blob), True, listening_ms=60_000)  # b's own ask crosses them: nothing is sent
    assert b.drain(1.0) == [] and a.drain(0.1) == []
    assert app.chunks_sent == 20 and app.chunks_shared == 1 + 20
    assert b"".join(f.data for _, f in sorted(got_b, key=lambda x: x[1].offset)) == blob[CHUNK:]

    _ask(c, "c", sha, 0, len(blob), False)  # c does not listen: its answer comes on its own topic only
    got_c = _frames(c, 20)
    assert {t for t, _ in got_c} == {device_topic("c", TopicKind.ARTIFACT_CHUNK)}
    assert b"".join(f.data for _, f in sorted(got_c, key=lambda x: x[1].offset)) == blob
    assert a.drain(1.0) == [] and b.drain(0.1) == []

    # c starts listening only now, after the broadcasts: it gets them again, to itself alone
    c.subscribe(artifact_topic(sha))
    _ask(c, "c", sha, 0, len(blob), True, listening_ms=0)
    assert {t for t, _ in _frames(c, 20)} == {device_topic("c", TopicKind.ARTIFACT_CHUNK)}
    assert a.drain(1.0) == [] and b.drain(0.1) == [] and app.chunks_sent == 60

    # a request in another chunk size, or at an unaligned offset, is answered to the device alone
    _ask(a, "a", sha, 0, 2 * CHUNK, True, listening_ms=60_000)  # aligned, right size: on its way already
    assert a.drain(1.0) == []
    a.publish(device_topic("a", TopicKind.ARTIFACT_REQUEST), encode(ChunkRequest(
        request_id=os.urandom(16).hex(), sha256=sha, offset=100, length=CHUNK, chunk_size=CHUNK, broadcast=True,
        listening_ms=60_000)))
    odd = _frames(a, 1)
    assert odd[0][0] == device_topic("a", TopicKind.ARTIFACT_CHUNK) and b.drain(1.0) == []

    # a device may listen, but never speak, on the broadcast topic; one without the artifact deployed is refused
    assert c.publish(artifact_topic(sha), b"EHC1 forged").value == 135
    d = connect("d", True)
    _ask(d, "d", sha, 0, CHUNK, True)
    assert decode(ErrorReply, d.get(10).payload).code.value == "not_found"
    assert a.drain(0.5) == []


@pytest.mark.integration
def test_unicast_mode_answers_every_request_on_the_devices_own_topic(served):
    start, blob, sha = served
    app, connect = start(broadcast=False)
    a, b = connect("a", True), connect("b", True)
    _ask(a, "a", sha, 0, len(blob), True)
    assert {t for t, _ in _frames(a, 20)} == {device_topic("a", TopicKind.ARTIFACT_CHUNK)}
    assert b.drain(1.0) == [] and app.chunks_shared == 0
