"""A server data directory with a signing key, small signed bundles of random bytes to push to it, and a wait."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import (
    ArtifactEntry,
    Manifest,
    Precision,
    RuntimeRequirement,
    ShapeRange,
    Target,
    TensorRTBuild,
    TensorSpec,
    encode_model,
    generate_signing_key,
    manifest_digest,
    private_key_to_pem,
    public_key_to_pem,
)
from protocol.signing import sign_manifest


def server_dir(path: Path, key: Ed25519PrivateKey | None = None) -> tuple[Path, Ed25519PrivateKey]:
    """A data directory holding a signing key pair (``key``, else a fresh one), as `edgeherd keys init` leaves
    it."""
    key = key or generate_signing_key()
    (path / "keys").mkdir(parents=True)
    (path / "keys" / "signing.key").write_bytes(private_key_to_pem(key))
    (path / "keys" / "signing.pub").write_bytes(public_key_to_pem(key.public_key()))
    return path, key


#: (name, target, precision, runtime, minimum version) of blob_bundle's one artifact by default.
BLOB = ("blob", Target.ONNX, Precision.FP32, "onnxruntime", "1.17")


def blob_bundle(path: Path, key: Ed25519PrivateKey, *, model: str = "blob", version: str = "1.0.0",
                size: int = 64 * 1024, author: str | None = None,
                artifacts: Sequence[tuple[str, Target, Precision, str, str]] = (BLOB,)) -> tuple[Path, bytes, str]:
    """A signed bundle whose artifacts (by default one, "blob") are ``size`` random bytes each; (dir, the first
    artifact's bytes, manifest digest)."""
    (path / "artifacts").mkdir(parents=True)
    entries, first = [], b""
    for name, target, precision, runtime, min_version in artifacts:
        blob = os.urandom(size)
        first = first or blob
        sha = hashlib.sha256(blob).hexdigest()
        (path / "artifacts" / sha).write_bytes(blob)
        entries.append(ArtifactEntry(name=name, target=target, precision=precision, sha256=sha, size=size,
                                     runtime=RuntimeRequirement(name=runtime, min_version=min_version),  # type: ignore[arg-type]
                                     inputs=[TensorSpec(name="x", shape=[-1, 1], dtype="float32")],
                                     outputs=[TensorSpec(name="y", shape=[-1, 1], dtype="float32")],
                                     tensorrt=TensorRTBuild(
                                         precision=precision, workspace_bytes=1 << 20, compute_capabilities=["8.7"],
                                         min_tensorrt=min_version,
                                         profiles=[ShapeRange(input="x", min=[1, 1], opt=[1, 1], max=[8, 1])])
                                     if target is Target.TENSORRT else None))
    m = Manifest(model=model, version=version, created_at=datetime.now(timezone.utc), task="classification",
                 artifacts=entries, author=author)
    (path / "manifest.json").write_bytes(encode_model(sign_manifest(m, key)))
    return path, first, manifest_digest(m)


def wait_for(fn: Callable[[], Any], timeout: float = 60.0, what: str = "condition", poll: float = 0.2) -> Any:
    """``fn()``'s first truthy value, asked every ``poll`` seconds; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def server_process(data: Path, broker: str, log: Path) -> subprocess.Popen[bytes]:
    """``edgeherd server run`` as a process of its own on an existing broker, orchestrating rollouts every 0.3 s
    (drift evaluation off), its output appended to ``log``: a replica a test can SIGKILL."""
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "server.cli", "server", "run", "--data-dir", str(data),
                                 "--broker", broker, "--metrics-port", "0", "--drift-interval", "0",
                                 "--rollout-interval", "0.3"], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
