"""docs/protocol.md stays true: its examples parse, its topic table matches the
code, and its example signature verifies with the key it publishes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol import (
    MESSAGE_FOR_TOPIC,
    TOPICS,
    DesiredState,
    DeviceState,
    SignedManifest,
    decode,
    decode_chunk,
    key_id,
    load_public_key,
    manifest_digest,
    verify_manifest,
)
from protocol._model import decode_model
from protocol.chunks import HEADER_SIZE

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(json|hex) (\w+)\n(.*?)^```", re.S | re.M)
MODELS = {cls.__name__: cls for cls in MESSAGE_FOR_TOPIC.values()} | {"SignedManifest": SignedManifest}
EXAMPLES = [(m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(DOC)]


def test_doc_has_an_example_of_every_message():
    named = {name for _, name, _ in EXAMPLES}
    assert set(MODELS) | {"ChunkFrame"} <= named, sorted(set(MODELS) - named)


@pytest.mark.parametrize(("lang", "name", "body"), EXAMPLES, ids=[f"{i}-{n}" for i, (_, n, _) in enumerate(EXAMPLES)])
def test_example_parses(lang, name, body):
    if lang == "hex":
        chunk = decode_chunk(bytes.fromhex(body.strip()))
        assert chunk.data == b"hello, edgeherd!"
        assert chunk.is_last and chunk.request_id == "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
        return
    cls = MODELS[name]
    value = decode_model(cls, body.encode()) if cls is SignedManifest else decode(cls, body.encode())
    assert isinstance(value, cls)


def _example_key():
    match = re.search(r"`(ed25519:[A-Za-z0-9+/=]+)`", DOC)
    assert match, "the doc must publish the example public key"
    return load_public_key(match.group(1))


def test_example_signature_verifies_and_digest_matches():
    pub = _example_key()
    signed = [decode_model(SignedManifest, body.encode()) for _, name, body in EXAMPLES if name == "SignedManifest"]
    assert signed
    for s in signed:
        manifest = verify_manifest(s, pub)
        assert s.signature.key_id == key_id(pub)
        assert manifest_digest(manifest) in DOC
    # the bundle embedded in the DesiredState example is the same signed manifest
    desired = [b for _, name, b in EXAMPLES if name == "DesiredState" and '"bundle"' in b]
    assert desired
    embedded = decode(DesiredState, desired[0].encode()).bundle
    assert embedded is not None and verify_manifest(embedded, pub) == signed[0].manifest


def test_chunk_artifact_sha_matches_manifest_example():
    frame = decode_chunk(bytes.fromhex(next(b for _, n, b in EXAMPLES if n == "ChunkFrame").strip()))
    assert f'"sha256": "{frame.artifact_sha256}"' in DOC
    assert "| 104 | *n* |" in DOC and HEADER_SIZE == 104


def test_topic_table_matches_code():
    rows = re.findall(r"^\| `([a-z/]+)` \| (\S+) \| (\d) \| (yes|no) \| ([^|]+) \|$", DOC, re.M)
    documented = {kind: (way, int(qos), ret == "yes", payload.strip()) for kind, way, qos, ret, payload in rows}
    expected = {s.kind.value: (s.direction.value, s.qos, s.retain, s.payload) for s in TOPICS.values()}
    assert documented == expected


def test_will_example_is_what_the_code_registers():
    from protocol import will_message

    wills = [decode(DeviceState, b.encode()) for _, n, b in EXAMPLES if n == "DeviceState" and '"lost"' in b]
    assert len(wills) == 1
    _, payload = will_message(wills[0].device_id, wills[0].session)
    assert decode(DeviceState, payload) == wills[0]
