"""Property tests: every decoder, fed random or mutated bytes, returns a valid
value or raises our own error, never anything else."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    ChunkFormatError,
    InvalidMessage,
    KeyFormatError,
    ProtocolError,
    SignedManifest,
    TopicError,
    decode,
    decode_chunk,
    decode_model,
    decode_signed_manifest,
    encode,
    encode_chunk,
    encode_model,
    load_private_key,
    load_public_key,
    parse_device_topic,
    private_key_to_pem,
    public_key_to_pem,
    public_key_to_text,
)
from protocol.chunks import Chunk
from tests.samples import SIGNING_KEY, all_messages

SAMPLES = all_messages()
DECODERS = sorted({type(m) for m in SAMPLES}, key=lambda c: c.__name__)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few random byte-level edits."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete" and buf:
            del buf[pos : pos + draw(st.integers(1, 8))]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


def _decode_or_own_error(cls, payload):
    try:
        value = decode(cls, payload)
    except InvalidMessage:
        return None
    assert isinstance(value, cls)
    return value


@pytest.mark.parametrize("cls", DECODERS, ids=lambda c: c.__name__)
@FUZZ
@given(payload=st.binary(max_size=512))
def test_random_bytes(cls, payload):
    _decode_or_own_error(cls, payload)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
@FUZZ
@given(data=st.data())
def test_mutated_bytes(msg, data):
    _decode_or_own_error(type(msg), data.draw(mutated(encode(msg))))


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
@FUZZ
@given(data=st.data(), value=json_values)
def test_structure_mutations(msg, data, value):
    """Replace one field (possibly nested one level) with an arbitrary JSON value."""
    obj = json.loads(encode(msg))
    key = data.draw(st.sampled_from(sorted(obj)))
    target = obj
    if isinstance(obj[key], dict) and obj[key] and data.draw(st.booleans()):
        target = obj[key]
        key = data.draw(st.sampled_from(sorted(target)))
    target[key] = value
    _decode_or_own_error(type(msg), json.dumps(obj).encode())


@FUZZ
@given(payload=st.binary(max_size=512) | st.builds(lambda j: json.dumps(j).encode(), json_values))
def test_signed_manifest_random(payload):
    with pytest.raises(ProtocolError):
        decode_signed_manifest(payload, SIGNING_KEY.public_key())


SIGNED = next(m.bundle for m in SAMPLES if getattr(m, "bundle", None) is not None)
SIGNED_BYTES = encode_model(SIGNED)


@FUZZ
@given(data=st.data())
def test_mutated_signed_manifest_is_rejected_or_identical(data):
    """Tampering never yields a different manifest that verifies."""
    payload = data.draw(mutated(SIGNED_BYTES))
    try:
        got = decode_signed_manifest(payload, SIGNING_KEY.public_key())
    except ProtocolError:
        return
    assert got == SIGNED.manifest


CHUNK = encode_chunk(Chunk("ab" * 16, "cd" * 32, 4096, 10_000, bytes(range(256)) * 8))


@FUZZ
@given(payload=st.binary(max_size=512) | mutated(CHUNK))
def test_chunk_decoder(payload):
    try:
        chunk = decode_chunk(payload)
    except ChunkFormatError:
        return
    assert chunk.end <= chunk.total_size
    assert encode_chunk(chunk) == payload


@FUZZ
@given(topic=st.text(max_size=80) | st.builds(lambda s: f"edgeherd/v1/devices/{s}", st.text(max_size=40)))
def test_topic_parser(topic):
    try:
        device_id, kind = parse_device_topic(topic)
    except TopicError:
        return
    assert topic.endswith(f"/{device_id}/{kind.value}")


PUB = SIGNING_KEY.public_key()


@FUZZ
@given(data=st.data())
def test_key_loaders(data):
    for loader, valid in (
        (load_public_key, public_key_to_pem(PUB)),
        (load_public_key, public_key_to_text(PUB).encode()),
        (load_private_key, private_key_to_pem(SIGNING_KEY)),
    ):
        payload = data.draw(st.binary(max_size=200) | mutated(valid))
        with contextlib.suppress(KeyFormatError):
            loader(payload)


def test_manifest_decoder_on_signed_envelope_fields():
    """The envelope's own decoder also only raises InvalidMessage."""
    with pytest.raises(InvalidMessage):
        decode_model(SignedManifest, b'{"manifest": {}, "signature": {}}')
