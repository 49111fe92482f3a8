"""Which artifacts a device may fetch, read for a whole batch of chunk requests at once (server/desired.py,
``desired_artifacts``): the same sets, device by device, as the one-device rule the server used to apply to
each request, through bundles, agent releases, revocation and unknown ids."""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
import threading
import time

import pytest

from protocol import ChunkRequest, ErrorReply, TopicKind, decode, device_topic, encode
from server.agent_releases import push, start_rollout
from server.app import ServerApp
from tests.server_helpers import blob_bundle, server_dir
from tests.tls_device_helpers import reachable


def _release_tar(path) -> None:  # type: ignore[no-untyped-def]
    wheel = b"never installed: only its sha256 matters here"
    name = "edgeherd-9.9.9-py3-none-any.whl"
    files = {"requirements.txt": f"edgeherd==9.9.9 --hash=sha256:{hashlib.sha256(wheel).hexdigest()}\n".encode(),
             f"wheelhouse/{name}": wheel}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


@pytest.fixture
def app(tmp_path):
    data, key = server_dir(reachable(tmp_path) / "server")
    app = ServerApp(data, metrics_port=0, drift_interval=3600, rollout_interval=0).start()
    try:
        reg = app.registry
        a, _, _ = blob_bundle(tmp_path / "a", key, model="a")
        b, _, _ = blob_bundle(tmp_path / "b", key, model="b")
        reg.push_model(a)
        reg.push_model(b)
        reg.add_devices_bulk(["dev-a", "dev-a2", "dev-b", "dev-none", "dev-gone", "dev-agent"], "simulated",
                             custom_profile=True)
        for device, model in (("dev-a", "a"), ("dev-a2", "a"), ("dev-b", "b"), ("dev-gone", "a"),
                              ("dev-agent", "b")):
            reg.deploy(model, "1.0.0", device, "blob")
        reg.revoke_device("dev-gone")
        tar = tmp_path / "release.tar"
        _release_tar(tar)
        release = push(reg, tar, key, f"{sys.version_info.major}.{sys.version_info.minor}", "alice")
        start_rollout(reg, "9.9.9", {"devices": ["dev-agent"]}, ["100%"], 600, "alice")
        app.release_sha = release.sha256  # type: ignore[attr-defined]
        yield app
    finally:
        app.stop()


@pytest.mark.integration
def test_a_batch_reads_the_same_artifacts_as_one_device_at_a_time(app):
    reg = app.registry
    ids = ["dev-a", "dev-a2", "dev-b", "dev-none", "dev-gone", "dev-agent", "nobody"]
    batch = reg.desired_artifacts([*ids, "dev-a"])  # a device with two requests in the batch
    assert set(batch) == set(ids)
    one_by_one = {d: reg.desired_bundle_artifacts(d) for d in ids}
    assert batch == one_by_one
    a, b = batch["dev-a"], batch["dev-b"]
    assert len(a) == len(b) == 1 and a != b and batch["dev-a2"] == a
    assert batch["dev-none"] == batch["dev-gone"] == batch["nobody"] == set()  # nothing desired, revoked, unknown
    assert batch["dev-agent"] == b | {app.release_sha}  # the bundle and the agent release's tar
    assert reg.desired_artifacts([]) == {}


@pytest.mark.integration
def test_a_queued_batch_of_requests_is_answered_by_each_devices_own_rights(app):
    """Requests for one artifact from a device that may fetch it and from one that may not, queued in one
    batch: the first gets its chunk, the second a not_found error, each on its own topic."""
    reg = app.registry
    sha = next(iter(reg.desired_artifacts(["dev-a"])["dev-a"]))
    got: dict[str, bytes] = {}
    arrived = threading.Event()

    def keep(topic: str, payload: bytes) -> None:
        got[topic] = payload
        if len(got) == 2:
            arrived.set()

    with reg.client() as bus:
        for topic in (device_topic("dev-a", TopicKind.ARTIFACT_CHUNK), device_topic("dev-b", TopicKind.ERROR)):
            bus.route(topic, keep)
            assert bus.subscribe(topic, qos=1, wait=10)
        now = time.monotonic()
        batch = [(device_topic(d, TopicKind.ARTIFACT_REQUEST),
                  encode(ChunkRequest(request_id=f"{i:032x}", sha256=sha, offset=0, length=4096, chunk_size=4096)),
                  now) for i, d in enumerate(["dev-a", "dev-b"])]
        allowed = app._allowed_artifacts(batch)
        assert allowed is not None and sha in allowed["dev-a"] and sha not in allowed["dev-b"]
        for topic, payload, received in batch:
            app._serve_chunks(topic, payload, received, allowed)
        assert arrived.wait(10), got.keys()
    error = decode(ErrorReply, got[device_topic("dev-b", TopicKind.ERROR)])
    assert error.code.value == "not_found" and error.request_id == f"{1:032x}"
    assert len(got[device_topic("dev-a", TopicKind.ARTIFACT_CHUNK)]) == 104 + 4096
