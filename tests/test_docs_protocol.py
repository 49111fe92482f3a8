"""docs/protocol.md stays true: its examples parse, its topic table and every field table match the
code (both ways), its canonical form is what gets signed, its example signature verifies with the key
it publishes, and the codec answers as it says (versions, request ids)."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from protocol import (
    MESSAGE_FOR_TOPIC,
    TOPICS,
    ChunkRequest,
    DesiredState,
    DeviceState,
    ErrorCode,
    InvalidMessage,
    PayloadTooLarge,
    SignedManifest,
    UnsupportedVersion,
    WireModel,
    decode,
    decode_chunk,
    decode_model,
    encode,
    error_reply_for,
    key_id,
    load_public_key,
    manifest_digest,
    verify_manifest,
    wire_bytes,
)
from protocol.chunks import HEADER_SIZE
from protocol.ids import DEVICE_ID_PATTERN
from tests.protocol_doc import ProtocolDoc, parse_type
from tests.samples import all_messages, manifest

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


# -- field tables against the models -----------------------------------------------------------------

PAGE = ProtocolDoc.parse(DOC)
#: The named string types of §3, by the pattern the code gives them.
NAMED = {DEVICE_ID_PATTERN: "device id", r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$": "name",
         r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$": "version", r"^[0-9a-f]{64}$": "sha256",
         r"^[0-9a-f]{32}$": "request id"}
#: Enumerations the doc names instead of listing their values in every table.
NAMED_ENUMS = {"ErrorCode": "error code"}


def _models() -> dict[str, type[WireModel]]:
    """Every model a message can contain, by class name: the messages, the manifest and all they nest."""
    found: dict[str, type[WireModel]] = {}

    def visit(t: Any) -> None:
        for arg in typing.get_args(t):
            visit(arg)
        if isinstance(t, type) and issubclass(t, BaseModel) and t.__name__ not in found:
            assert issubclass(t, WireModel)
            found[t.__name__] = t
            for f in t.model_fields.values():
                visit(f.annotation)

    for cls in [*MESSAGE_FOR_TOPIC.values(), SignedManifest]:
        visit(cls)
    return found


MODEL_CLASSES = _models()


def _doc_type(node: dict[str, Any], defs: dict[str, Any]) -> str:
    """A JSON schema node of a field, in the words of the doc's type table."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        target = defs[name]
        if "enum" in target:
            return NAMED_ENUMS.get(name) or " | ".join(f"`{v}`" for v in target["enum"])
        return name
    for key in ("anyOf", "oneOf"):
        if key in node:
            return " | ".join(_doc_type(a, defs) for a in node[key] if a.get("type") != "null")
    if "const" in node:
        return f"`{node['const']}`"
    if "enum" in node:
        return " | ".join(f"`{v}`" for v in node["enum"])
    match node.get("type"):
        case "string":
            return "time" if node.get("format") == "date-time" else NAMED.get(node.get("pattern", ""), "string")
        case "integer" | "number" | "boolean" as scalar:
            return str(scalar)
        case "array" if "prefixItems" in node:
            return "[" + ", ".join(_doc_type(a, defs) for a in node["prefixItems"]) + "]"
        case "array":
            return "list of " + _doc_type(node["items"], defs)
        case "object":
            ((pattern, value),) = node["patternProperties"].items()
            return f"map of {NAMED.get(pattern, 'string')} to {_doc_type(value, defs)}"
    raise AssertionError(f"no doc type for {node}")


def _code_table(cls: type[WireModel]) -> dict[str, tuple[str, bool, Any]]:
    """field -> (doc type, required, default or None) as the code has it."""
    schema = cls.model_json_schema()
    defs = schema.get("$defs", {})
    out = {}
    for name, f in cls.model_fields.items():
        key = f.alias or name
        default = None if f.is_required() else to_jsonable_python(f.get_default(call_default_factory=True))
        out[key] = (_doc_type(schema["properties"][key], defs), f.is_required(), default)
    return out


def test_every_model_has_one_field_table_and_every_table_a_model():
    assert set(PAGE.tables) == set(MODEL_CLASSES), (
        f"tables missing from docs/protocol.md: {sorted(set(MODEL_CLASSES) - set(PAGE.tables))}; "
        f"tables of no model: {sorted(set(PAGE.tables) - set(MODEL_CLASSES))}")


@pytest.mark.parametrize("model", sorted(MODEL_CLASSES))
def test_field_table_matches_the_model(model):
    code = _code_table(MODEL_CLASSES[model])
    doc = PAGE.tables.get(model, {})
    assert set(doc) == set(code), (f"{model}: fields only in the code: {sorted(set(code) - set(doc))}; "
                                   f"only in the doc: {sorted(set(doc) - set(code))}")
    assert list(doc) == list(code), f"{model}: list the fields in the code's order, {list(code)}"
    for name, (typ, required, default) in code.items():
        f = doc[name]
        assert str(parse_type(f.type)) == typ, f"{model}.{name}: the doc says {f.type!r}, the code {typ!r}"
        assert f.required == required, f"{model}.{name}: required is {required} in the code"
        if not required:
            assert f.has_default == (default is not None) and f.default == default, (
                f"{model}.{name}: the code's default is {json.dumps(default)}")


def test_named_types_are_the_codes_patterns():
    assert set(PAGE.patterns) == set(NAMED.values())
    probes = ["a", "A", "0", "-a", "a-", "a.b", "a_b", "1.2.3+rc1", "a b", "", "x" * 63, "x" * 64, "x" * 65,
              "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "0F1E2D3C4B5A69788796A5B4C3D2E1F0", "3f" * 32, "3f" * 33,
              "pi5-kitchen", "Pi5", "a/b", "a+b", "2026.11.28+rc1", "x" * 32, "x" * 33]
    for pattern, name in NAMED.items():
        for probe in probes:
            assert bool(re.fullmatch(PAGE.patterns[name], probe)) == bool(re.fullmatch(pattern, probe)), (
                f"{name}: the doc's pattern and the code's disagree on {probe!r}")


def test_error_code_table_lists_every_code():
    assert sorted(PAGE.error_codes) == sorted(c.value for c in ErrorCode)


@pytest.mark.parametrize(("lang", "name", "body"), [e for e in EXAMPLES if e[0] == "json"],
                         ids=[f"{i}-{n}" for i, (lang, n, _) in enumerate(EXAMPLES) if lang == "json"])
def test_example_is_valid_by_the_tables(lang, name, body):
    PAGE.check(name, json.loads(body))


@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: type(m).__name__)
def test_what_the_code_sends_is_valid_by_the_tables(msg):
    """Fully populated messages (a manifest with preprocessing, an opset, TensorRT settings, a confidence
    histogram) are accepted by a reader that knows only the tables."""
    PAGE.check(type(msg).__name__, json.loads(encode(msg)))


def test_a_field_the_tables_do_not_know_is_refused_by_them():
    value = json.loads(encode(all_messages()[0]))
    with pytest.raises(ValueError, match="unknown fields"):
        PAGE.check("DeviceState", {**value, "colour": "blue"})
    with pytest.raises(ValueError, match="is not integer"):
        PAGE.check("DeviceState", {**value, "seq": 3.0})


def test_canonical_form_as_the_doc_describes_it_is_what_is_signed():
    m = manifest()
    sent = json.loads(wire_bytes(m))
    assert PAGE.canonical("Manifest", sent) == wire_bytes(m)
    # a sender that leaves out fields at their defaults and writes whole values of number fields as
    # integers names the same manifest: the canonical bytes are the same
    del sent["preprocessing"]["description"], sent["preprocessing"]["in_graph"]
    del sent["artifacts"][0]["smoke"]["min_agreement"]
    sent["reference"]["features"][0]["edges"] = [0, 0.5, 1, 16]
    assert PAGE.canonical("Manifest", sent) == wire_bytes(m)
    assert PAGE.canonical("Manifest", sent) == wire_bytes(decode_model(type(m), json.dumps(sent).encode()))


# -- the codec answers as the doc says -----------------------------------------------------------------

REQ = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
GOOD = {"chunk_size": 65536, "length": 4096, "offset": 0, "request_id": REQ, "sha256": "3f" * 32, "v": 1}


def _fails(payload: bytes) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        decode(ChunkRequest, payload)
    return info.value


def test_another_version_is_unsupported_not_malformed():
    """§10: a `v` the receiver does not speak is refused as such, even with fields that version may add."""
    exc = _fails(json.dumps({**GOOD, "v": 2, "priority": "high"}).encode())
    assert isinstance(exc, UnsupportedVersion) and exc.supported == (1,) and exc.request_id == REQ
    reply = error_reply_for(exc)
    assert reply.code is ErrorCode.UNSUPPORTED_VERSION and reply.request_id == REQ and "1" in reply.message
    # a v that is not a version at all is a bad request
    assert error_reply_for(_fails(json.dumps({**GOOD, "v": "2"}).encode())).code is ErrorCode.BAD_REQUEST
    assert decode(ChunkRequest, json.dumps({k: v for k, v in GOOD.items() if k != "v"}).encode()).v == 1


@pytest.mark.parametrize("payload", [
    json.dumps({**GOOD, "priority": "high"}).encode(),  # an unknown field
    json.dumps({**GOOD, "length": "4096"}).encode(),  # a wrong type
    json.dumps(GOOD).encode()[:-1] + b', "offset": 1}',  # duplicate keys: not strict JSON
], ids=["extra-field", "wrong-type", "duplicate-key"])
def test_a_refused_request_still_names_its_request_id(payload):
    exc = _fails(payload)
    reply = error_reply_for(exc)
    assert reply.code is ErrorCode.BAD_REQUEST and reply.request_id == REQ


@pytest.mark.parametrize(("payload", "code"), [
    (json.dumps({**GOOD, "request_id": "not-an-id", "x": 1}).encode(), ErrorCode.BAD_REQUEST),
    (b"not json", ErrorCode.BAD_REQUEST),
    (json.dumps({**GOOD, "pad": "x" * 2000}).encode(), ErrorCode.TOO_LARGE),
])
def test_no_request_id_where_none_can_be_read(payload, code):
    exc = _fails(payload)
    assert error_reply_for(exc).code is code and exc.request_id is None
    assert isinstance(exc, PayloadTooLarge) == (code is ErrorCode.TOO_LARGE)
