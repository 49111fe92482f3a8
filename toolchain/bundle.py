"""Signed bundles on disk: write atomically, pack as .tar, verify, inspect.

Layout of a bundle directory::

    manifest.json          the signed manifest (protocol.SignedManifest, canonical JSON)
    MODEL_CARD.md          generated from the manifest and the build report
    build-report.json      validation findings, evaluations, rejected artifacts
    artifacts/<sha256>     each artifact, named by its content hash

A build writes into a temporary directory beside the target and renames it
into place at the end, so a failed or interrupted build leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hardware.files import sha256_file
from protocol import (
    KeyFormatError,
    Manifest,
    ProtocolError,
    SignedManifest,
    decode_model,
    decode_signed_manifest,
    encode_model,
    load_private_key,
    sign_manifest,
)
from protocol.signing import Ed25519PrivateKey, Ed25519PublicKey
from toolchain.errors import BundleError, SigningKeyError

__all__ = ["Inspection", "bundle_staging", "inspect_bundle", "load_signing_key", "pack_tar", "report_json",
           "sha256_file", "verify_bundle", "write_signed_manifest"]

MANIFEST = "manifest.json"
CARD = "MODEL_CARD.md"
REPORT = "build-report.json"
ARTIFACTS = "artifacts"
MAX_MANIFEST_BYTES = SignedManifest.MAX_BYTES


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(
            f"signing key {path} does not exist; create one with `edgeherd keys generate --out {path.parent}`"
        ) from None
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        return load_private_key(data)
    except KeyFormatError as exc:
        raise SigningKeyError(f"{path}: {exc}") from None


def _describe_existing(out: Path) -> str:
    try:
        m = decode_model(SignedManifest, (out / MANIFEST).read_bytes()).manifest
        return f"a bundle of {m.model} {m.version}"
    except (OSError, ProtocolError):
        return "other files"


@contextmanager
def bundle_staging(out: Path) -> Iterator[Path]:
    """A temporary directory that becomes ``out`` if the block succeeds, and vanishes if it fails."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} already holds {_describe_existing(out)}; choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        (staging / ARTIFACTS).mkdir()
        yield staging
        os.chmod(staging, 0o755)  # noqa: S103 - a bundle is public; its signature protects it
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_signed_manifest(staging: Path, manifest: Manifest, key: Ed25519PrivateKey) -> SignedManifest:
    signed = sign_manifest(manifest, key)
    (staging / MANIFEST).write_bytes(encode_model(signed))
    return signed


def pack_tar(bundle: Path, dest: Path) -> None:
    """Pack a bundle directory as an uncompressed tar (artifacts are already dense)."""
    tmp = dest.with_name(f".{dest.name}.partial")
    with tarfile.open(tmp, "w") as tar:
        for path in sorted(bundle.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(bundle)), recursive=False)
    os.replace(tmp, dest)


@dataclass(frozen=True)
class Inspection:
    manifest: Manifest
    signed_by: str
    files_ok: dict[str, bool]
    verified: bool


@contextmanager
def _opened(path: Path) -> Iterator[Path]:
    """A bundle directory, or a .tar unpacked into a temporary one."""
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise BundleError(f"{path} does not exist")
    if not tarfile.is_tarfile(path):
        raise BundleError(f"{path} is neither a bundle directory nor a .tar of one")
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(path) as tar:
        try:
            tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise BundleError(f"{path}: cannot unpack: {exc}") from None
        yield Path(tmp)


def _read_manifest(root: Path) -> tuple[bytes, SignedManifest]:
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} has no {MANIFEST}; is it a bundle?")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath} is larger than {MAX_MANIFEST_BYTES} bytes")
    data = mpath.read_bytes()
    try:
        return data, decode_model(SignedManifest, data)
    except ProtocolError as exc:
        raise BundleError(f"{mpath}: {exc}") from None


def _check_files(root: Path, manifest: Manifest) -> dict[str, bool]:
    ok = {}
    for art in manifest.artifacts:
        f = root / ARTIFACTS / art.sha256
        ok[art.name] = f.is_file() and f.stat().st_size == art.size and sha256_file(f) == art.sha256
    return ok


def verify_bundle(path: Path, pub: Ed25519PublicKey) -> Manifest:
    """Verify the signature against ``pub`` and every artifact's size and sha256."""
    with _opened(path) as root:
        data, _ = _read_manifest(root)
        try:
            manifest = decode_signed_manifest(data, pub)
        except ProtocolError as exc:
            raise BundleError(f"{path}: {exc}") from None
        bad = [name for name, good in _check_files(root, manifest).items() if not good]
        if bad:
            raise BundleError(f"{path}: artifact(s) {', '.join(bad)} missing or not matching their sha256 and size")
        return manifest


def inspect_bundle(path: Path, pub: Ed25519PublicKey | None = None) -> Inspection:
    """Read a bundle without trusting it: manifest, signer, per-file hash check, signature if a key is given."""
    with _opened(path) as root:
        data, signed = _read_manifest(root)
        verified = False
        if pub is not None:
            try:
                decode_signed_manifest(data, pub)
                verified = True
            except ProtocolError:
                verified = False
        return Inspection(signed.manifest, signed.signature.key_id, _check_files(root, signed.manifest), verified)


def report_json(report: dict[str, object]) -> str:
    return json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"

