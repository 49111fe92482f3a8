"""Round trips and validation rules of every wire message and the manifest."""

from __future__ import annotations

import json

import pytest

from protocol import (
    MESSAGE_FOR_TOPIC,
    ChunkRequest,
    DesiredState,
    DeviceState,
    FeatureStats,
    InvalidMessage,
    Manifest,
    TelemetryWindow,
    TopicKind,
    decode,
    decode_for_topic,
    decode_model,
    encode,
    encode_model,
    manifest_digest,
    will_message,
)
from tests.samples import all_messages, manifest

MESSAGES = all_messages()


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = encode(msg)
    assert decode(type(msg), data) == msg
    # canonical: encoding is stable and re-encoding the decoded value gives the same bytes
    assert encode(decode(type(msg), data)) == data
    assert json.loads(data) == json.loads(json.dumps(json.loads(data), sort_keys=True))


def test_every_message_type_has_a_sample():
    sampled = {type(m) for m in MESSAGES}
    assert set(MESSAGE_FOR_TOPIC.values()) <= sampled


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_decode_for_topic_matches(msg):
    kind = next(k for k, cls in MESSAGE_FOR_TOPIC.items() if cls is type(msg))
    assert decode_for_topic(kind, encode(msg)) == msg


def test_manifest_round_trip_and_digest():
    m = manifest()
    data = encode_model(m)
    back = decode_model(Manifest, data)
    assert back == m
    assert manifest_digest(back) == manifest_digest(m)
    assert json.loads(data)["schema"] == "edgeherd.manifest/1"


def _mutate(msg, **changes):
    obj = json.loads(encode(msg))
    for key, value in changes.items():
        if value is ...:
            del obj[key]
        else:
            obj[key] = value
    return json.dumps(obj).encode()


STATE = next(m for m in MESSAGES if isinstance(m, DeviceState))
TELEMETRY = next(m for m in MESSAGES if isinstance(m, TelemetryWindow))
REQUEST = next(m for m in MESSAGES if isinstance(m, ChunkRequest))
STATS = next(m for m in MESSAGES if isinstance(m, FeatureStats))


@pytest.mark.parametrize(
    ("cls", "payload", "fragment"),
    [
        (DeviceState, _mutate(STATE, extra_field=1), "extra_field"),
        (DeviceState, _mutate(STATE, device_id="Pi/5"), "device_id"),
        (DeviceState, _mutate(STATE, device_id="a" * 64), "device_id"),
        (DeviceState, _mutate(STATE, device_id="pi+"), "device_id"),
        (DeviceState, _mutate(STATE, seq="3"), "seq"),
        (DeviceState, _mutate(STATE, v=2), "v"),
        (DeviceState, _mutate(STATE, status=...), "status"),
        (DeviceState, _mutate(STATE, ts="2026-11-28T09:00:00"), "ts"),  # naive time
        (TelemetryWindow, _mutate(TELEMETRY, errors=601), "errors cannot exceed requests"),
        (TelemetryWindow, _mutate(TELEMETRY, requests=-1), "requests"),
        (TelemetryWindow, _mutate(TELEMETRY, latency_counts=[1, 2]), "latency_counts"),
        (TelemetryWindow, _mutate(TELEMETRY, end="2026-11-28T08:59:59Z"), "end is before start"),
        (FeatureStats, _mutate(STATS, end="2026-11-28T08:59:59Z"), "end is before start"),
        (FeatureStats, _mutate(STATS, n=601), "but n = 601"),
        (ChunkRequest, _mutate(REQUEST, length=1024 * 1024 + 1), "length"),
        (ChunkRequest, _mutate(REQUEST, chunk_size=1024), "chunk_size"),
        (ChunkRequest, _mutate(REQUEST, sha256="3F" * 32), "sha256"),
        (ChunkRequest, b'{"v":1,"v":1}', "duplicate key"),
        (ChunkRequest, b'{"v":NaN}', "NaN"),
        (ChunkRequest, b"\xff\xfe", "UTF-8"),
        (FeatureStats, b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (ChunkRequest, b" " * 2048, "limit is 1024"),
    ],
)
def test_rejections_name_the_problem(cls, payload, fragment):
    with pytest.raises(InvalidMessage) as err:
        decode(cls, payload)
    assert fragment in str(err.value)


def test_list_caps_are_enforced():
    obj = json.loads(encode(TELEMETRY))
    obj["latency_edges_ms"] = [float(i) for i in range(100)]
    obj["latency_counts"] = [0] * 99
    with pytest.raises(InvalidMessage, match="latency_edges_ms"):
        decode(TelemetryWindow, json.dumps(obj).encode())


def test_desired_state_artifact_must_be_in_bundle():
    desired = next(m for m in MESSAGES if isinstance(m, DesiredState) and m.bundle is not None)
    with pytest.raises(InvalidMessage, match="not in the bundle"):
        decode(DesiredState, _mutate(desired, artifact="nope"))
    with pytest.raises(InvalidMessage, match="together"):
        decode(DesiredState, _mutate(desired, artifact=...))


def test_will_message_is_a_retained_offline_state():
    topic, payload = will_message("pi5-kitchen", session=99)
    assert topic == "edgeherd/v1/devices/pi5-kitchen/state"
    state = decode(DeviceState, payload)
    assert (state.status, state.reason, state.session) == ("offline", "lost", 99)
    # a will is the end of its session: it orders after every state of that session
    assert state.seq > STATE.seq


def test_decode_for_topic_refuses_binary_kind():
    with pytest.raises(ValueError, match="decode_chunk"):
        decode_for_topic(TopicKind.ARTIFACT_CHUNK, b"{}")


def test_encode_refuses_oversize_message():
    big = ChunkRequest.model_construct(**{**REQUEST.model_dump(), "sha256": "a" * 5000})
    with pytest.raises(InvalidMessage, match="exceeds the limit"):
        encode(big)


def _manifest_with(mutate):
    obj = json.loads(encode_model(manifest()))
    mutate(obj)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda m: m["artifacts"][2].update(target="onnx"), "TensorRT build settings"),
        (lambda m: m["artifacts"][0].update(tensorrt=m["artifacts"][2]["tensorrt"]), "TensorRT build settings"),
        (lambda m: m["artifacts"][2]["tensorrt"]["profiles"][0].update(max=[1, 1, 4, 8]), "min <= opt <= max"),
        (lambda m: m["artifacts"][2]["tensorrt"]["profiles"][0].update(max=[1, 8, 8]), "same rank"),
        (lambda m: m["artifacts"][2]["tensorrt"].update(compute_capabilities=["sm87"]), "compute_capabilities"),
        (lambda m: m["reference"].update(kind="image"), "summary function"),
        (lambda m: m["reference"]["features"][0].update(edges=[0.0, 1.0, 0.5, 16.0]), "strictly increasing"),
        (lambda m: m["reference"]["features"][0].update(counts=[1, 2]), "need 3 counts"),
        (lambda m: m["artifacts"][1].update(name="digits-onnx-int8"), "unique"),
        (lambda m: m["golden"].update(labels=[0, 1]), "2 labels for 1 golden inputs"),
        (lambda m: m["preprocessing"].update(std=[0.0]), "std"),
    ],
)
def test_manifest_rules(mutate, fragment):
    with pytest.raises(InvalidMessage, match=fragment):
        decode_model(Manifest, _manifest_with(mutate))
