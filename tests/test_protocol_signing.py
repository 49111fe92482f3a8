"""Ed25519 signing of manifests: tamper, wrong key, key formats."""

from __future__ import annotations

import json

import pytest

from protocol import (
    KeyFormatError,
    ProtocolError,
    SignatureError,
    decode_signed_manifest,
    encode_model,
    generate_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    private_key_to_pem,
    public_key_to_pem,
    public_key_to_text,
    sign_manifest,
    verify_manifest,
)
from tests.samples import manifest

KEY = generate_signing_key()
PUB = KEY.public_key()
SIGNED = sign_manifest(manifest(), KEY)
PAYLOAD = encode_model(SIGNED)


def test_sign_and_verify():
    assert verify_manifest(SIGNED, PUB) == manifest()
    assert decode_signed_manifest(PAYLOAD, PUB) == manifest()
    assert SIGNED.signature.key_id == key_id(PUB)


def test_signed_by_another_key_fails_and_names_both_keys():
    other = generate_signing_key()
    with pytest.raises(SignatureError) as err:
        decode_signed_manifest(encode_model(sign_manifest(manifest(), other)), PUB)
    assert key_id(PUB) in str(err.value) and key_id(other.public_key()) in str(err.value)


def test_other_key_claiming_our_key_id_fails():
    """A forger who copies our key id still cannot produce a valid signature."""
    forged = sign_manifest(manifest(), generate_signing_key())
    forged = forged.model_copy(update={"signature": forged.signature.model_copy(update={"key_id": key_id(PUB)})})
    with pytest.raises(SignatureError, match="does not match"):
        verify_manifest(forged, PUB)


def _with_field(path, value):
    obj = json.loads(PAYLOAD)
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("manifest", "version"), "1.0.1"),
        (("manifest", "model"), "digitz"),
        (("manifest", "artifacts", 0, "sha256"), "00" * 32),
        (("manifest", "artifacts", 0, "size"), 24_577),
        (("manifest", "artifacts", 0, "runtime", "min_version"), "1.0.0"),
        (("manifest", "golden", "labels", 0), 1),
        (("manifest", "lineage", "seed"), "4321"),
        (("manifest", "reference", "features", 0, "counts", 0), 701),
    ],
)
def test_one_field_changed_fails_verification(path, value):
    with pytest.raises(SignatureError, match="does not match its contents"):
        decode_signed_manifest(_with_field(path, value), PUB)


def test_every_single_byte_change_in_the_manifest_is_caught():
    """Flip each byte of the manifest part (stride 7 to keep it quick): never a different manifest."""
    start = PAYLOAD.index(b'"manifest":') + len(b'"manifest":')
    end = PAYLOAD.index(b',"signature":')
    accepted_identical = 0
    for i in range(start, end, 7):
        buf = bytearray(PAYLOAD)
        buf[i] = (buf[i] + 1) % 256
        try:
            got = decode_signed_manifest(bytes(buf), PUB)
        except ProtocolError:
            continue
        assert got == manifest(), f"byte {i} changed the manifest and it still verified"
        accepted_identical += 1
    # canonical JSON has no slack: almost every edit must be rejected
    assert accepted_identical <= 2


def test_signature_bytes_tampered():
    obj = json.loads(PAYLOAD)
    sig = obj["signature"]["value"]
    obj["signature"]["value"] = ("B" if sig[0] != "B" else "C") + sig[1:]
    with pytest.raises(SignatureError):
        decode_signed_manifest(json.dumps(obj).encode(), PUB)


def test_key_formats_round_trip():
    assert key_id(load_public_key(public_key_to_pem(PUB))) == key_id(PUB)
    assert key_id(load_public_key(public_key_to_text(PUB))) == key_id(PUB)
    assert key_id(load_public_key(public_key_to_text(PUB) + "\n")) == key_id(PUB)
    assert key_id(load_private_key(private_key_to_pem(KEY)).public_key()) == key_id(PUB)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"ed25519:",
        b"ed25519:not base64!",
        b"ed25519:" + b"QUJD",  # 3 bytes, not 32
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    ],
)
def test_bad_public_keys(data):
    with pytest.raises(KeyFormatError):
        load_public_key(data)


def test_non_ed25519_keys_are_refused():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1())
    pem = other.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(KeyFormatError, match="Ed25519"):
        load_public_key(pem)
    with pytest.raises(KeyFormatError, match="Ed25519"):
        load_private_key(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    with pytest.raises(KeyFormatError):
        load_private_key(public_key_to_pem(PUB))
