"""Size, accuracy and single-sample latency of each artifact of the digits bundle,
relative to fp32 ONNX Runtime measured in the same run.

Latency is measured round-robin (one call of each artifact in turn, many
rounds) so that machine noise hits every artifact alike; the figure is the
median of the per-call times.

Run: ``make bench`` or ``python -m benchmarks.toolchain_targets [--bundle DIR] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from agent.backends import open_backend
from protocol import Target, generate_signing_key, private_key_to_pem
from protocol._model import decode_model
from protocol.signing import SignedManifest
from toolchain.bundle import ARTIFACTS, MANIFEST
from toolchain.data import load_digits, split_indices
from toolchain.pipeline import BuildSpec, build


def _bundle(path: Path | None, tmp: Path) -> Path:
    if path is not None:
        return path
    (tmp / "k").write_bytes(private_key_to_pem(generate_signing_key()))
    print("building the digits bundle ...", flush=True)
    return build(BuildSpec(recipe="digits", out=tmp / "digits", key=tmp / "k", tar=False)).out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, help="an existing digits bundle directory (default: build one)")
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = _bundle(args.bundle, Path(tmp))
        manifest = decode_model(SignedManifest, (root / MANIFEST).read_bytes()).manifest
        ds = load_digits()
        test = split_indices(ds.y, int(manifest.lineage.get("seed", "0")))["test"]
        x, y = ds.x[test], ds.y[test]
        arts = [a for a in manifest.artifacts if a.target is not Target.TENSORRT]
        backends = {a.name: open_backend(root / ARTIFACTS / a.sha256,
                                         "onnxruntime" if a.target is Target.ONNX else "ai-edge-litert")
                    for a in arts}
        accuracy = {n: float((b.predict(x).argmax(1) == y).mean()) for n, b in backends.items()}
        times: dict[str, list[float]] = {n: [] for n in backends}
        for r in range(args.rounds):
            sample = x[r % len(x) : r % len(x) + 1]
            for n, b in backends.items():
                t0 = time.perf_counter()
                b.predict(sample)
                times[n].append(time.perf_counter() - t0)
        base = next(a for a in arts if a.target is Target.ONNX and a.precision.value == "fp32")
        b_lat = statistics.median(times[base.name][100:])
        print(f"\n{'artifact':22s} {'size B':>9s} {'size×':>6s} {'accuracy':>9s} {'Δ pts':>6s} "
              f"{'p50 µs':>8s} {'latency×':>9s}")
        for a in arts:
            lat = statistics.median(times[a.name][100:])
            print(f"{a.name:22s} {a.size:9d} {a.size / base.size:6.2f} {accuracy[a.name]:9.4f} "
                  f"{(accuracy[a.name] - accuracy[base.name]) * 100:+6.2f} {lat * 1e6:8.1f} {lat / b_lat:9.2f}")
        print(f"\nbaseline: {base.name}, {args.rounds} rounds, median of per-call times; ratios < 1 are smaller/faster")


if __name__ == "__main__":
    main()
