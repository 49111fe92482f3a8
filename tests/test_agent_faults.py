"""Faults during an install: afterwards the device runs the old or the new model, and says which."""

from __future__ import annotations

import json

import pytest

from protocol import Chunk, Manifest, decode_chunk, decode_model, encode_chunk, generate_signing_key, sign_manifest

pytestmark = pytest.mark.integration

FP32, INT8 = "digits-onnx-fp32", "digits-onnx-int8"


def _running(agent):
    pred = agent.predictor()
    return pred.artifact.name if pred else None


def test_chunk_corrupted_in_transit_is_dropped_and_fetched_again(fleet, digits_bundle, caplog):
    server, make = fleet
    # a request is asked again after 5 s of silence: long enough that a loaded machine does not make the agent
    # ask again for bytes on their way (it asks for the rest of the file as soon as the first chunk lands)
    agent = make(download_timeout=5.0)
    size = digits_bundle.signed.manifest.artifact(FP32).size
    assert agent.chunk_size < size <= 1024 * 1024  # the first request covers the file, in several chunks
    hits = []

    def corrupt_second_frame_once(i, frame):
        if i == 1 and not hits:
            hits.append(decode_chunk(frame).offset)
            return frame[:-1] + bytes([frame[-1] ^ 0xFF])  # the frame's own sha256 no longer matches
        return frame

    server.mangle = corrupt_second_frame_once
    server.desire("pi-1", 1, digits_bundle.signed, FP32)
    server.wait_running(FP32)
    assert hits and _running(agent) == FP32
    bad = hits[0]
    assert f"data at offset {bad} does not match its sha256 (corrupted in transit)" in caplog.text
    first, *again = [(r.offset, r.length) for r in server.seen.requests]
    assert first == (0, size)
    # the dropped chunk is asked for again, and nothing that had arrived intact before it
    assert any(off <= bad < off + n for off, n in again), again
    assert all(off >= bad for off, _ in again), again
    # no second download of the whole file: it hashed right the first time
    assert agent.record.attempts == 0
    # and nothing asked for twice but the lost chunk: a range in flight is not asked for again as it arrives
    assert sum(n for _, n in [first, *again]) <= size + agent.chunk_size, [first, *again]


def test_artifact_corrupted_at_the_source_fails_verification_and_keeps_the_old_model(fleet, digits_bundle):
    server, make = fleet
    agent = make(download_timeout=1.0)
    server.desire("pi-1", 1, digits_bundle.signed, FP32)
    server.wait_running(FP32)

    def wrong_bytes(i, frame):  # a well-formed frame carrying the wrong data
        c = decode_chunk(frame)
        return encode_chunk(Chunk(c.request_id, c.artifact_sha256, c.offset, c.total_size,
                                  bytes(b ^ 0x55 for b in c.data)))

    server.mangle = wrong_bytes
    server.desire("pi-1", 2, digits_bundle.signed, INT8)
    state = server.wait_install("reverted")
    assert "verify" in state.install.error and "sha256" in state.install.error
    assert state.running.artifact == FP32 and _running(agent) == FP32


def test_download_resumes_after_the_broker_restarts_mid_transfer(fleet, digits_bundle, mosquitto):
    server, make = fleet
    make(download_timeout=30.0)
    first = []

    def stall_after_two_frames(i, frame):
        rid = decode_chunk(frame).request_id
        if not first:
            first.append(rid)
        return frame if rid != first[0] or i < 2 else None

    server.mangle = stall_after_two_frames
    server.desire("pi-1", 1, digits_bundle.signed, FP32)
    server.wait(lambda s: len(first) == 1 and any(st.install and st.install.progress for st in s.states),
                what="a partial download")
    mosquitto.stop()
    mosquitto.start()
    server.wait_running(FP32, timeout=90)
    resumed = [r for r in server.seen.requests if r.request_id != first[0]]
    # it asked for the missing part, from where it stopped, not for the whole file again
    assert resumed and resumed[0].offset > 0 and resumed[0].offset % (16 * 1024) == 0


def test_bundle_signed_by_a_foreign_key_is_refused_before_download(fleet, digits_bundle):
    server, make = fleet
    agent = make()
    forged = sign_manifest(digits_bundle.signed.manifest, generate_signing_key())
    server.desire("pi-1", 1, forged, FP32)
    state = server.wait_install("failed")
    assert state.install.error.startswith("verify: ") and "which this device does not trust" in state.install.error
    assert server.seen.requests == [] and _running(agent) is None


def test_missing_runtime_is_refused_before_download(fleet, digits_bundle):
    server, make = fleet
    make()
    server.desire("pi-1", 1, digits_bundle.signed, "digits-tensorrt-fp16")
    state = server.wait_install("failed")
    assert state.install.error.startswith("preflight:") and "tensorrt >= 10.0, which is not installed" in \
        state.install.error
    assert server.seen.requests == []


def test_failing_smoke_test_reverts_to_the_previous_model(fleet, digits_bundle):
    server, make = fleet
    agent = make()
    server.desire("pi-1", 1, digits_bundle.signed, FP32)
    server.wait_running(FP32)
    manifest = digits_bundle.signed.manifest
    doc = json.loads(manifest.model_dump_json(by_alias=True, exclude_none=True))
    art = next(a for a in doc["artifacts"] if a["name"] == INT8)
    art["smoke"]["outputs"] = [[v + 5.0 for v in row] for row in art["smoke"]["outputs"]]
    altered = sign_manifest(decode_model(Manifest, json.dumps(doc).encode()), digits_bundle.key)  # signed, but wrong
    server.desire("pi-1", 2, altered, INT8)
    state = server.wait_install("reverted")
    assert state.install.error.startswith("smoke_test:") and "differ" in state.install.error
    assert state.running.artifact == FP32 and _running(agent) == FP32
    # the next good bundle installs into the same idle slot
    server.desire("pi-1", 3, digits_bundle.signed, INT8)
    assert server.wait_running(INT8).running.slot != state.running.slot
