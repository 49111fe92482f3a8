"""Cost of the protocol codec, as ratios against baselines run in the same process.

- decode: strict validation (duplicate-key check + pydantic strict) vs a bare
  ``json.loads`` of the same bytes;
- encode: canonical JSON of a model vs ``json.dumps`` of the equivalent dict;
- chunk frames: ``decode_chunk`` (header parse + sha256 of the data) vs a bare
  ``hashlib.sha256`` of the data, for 64 KiB chunks;
- manifest verification: parse + Ed25519 verify vs parse alone.

Run: ``make bench`` (or ``python -m benchmarks.bench_protocol``).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable

from protocol import decode, decode_chunk, decode_model, decode_signed_manifest, encode, encode_chunk, encode_model
from protocol.chunks import Chunk
from protocol.signing import SignedManifest
from tests.samples import SIGNING_KEY, all_messages


def per_call(fn: Callable[[], object], *, min_time: float = 0.2, repeats: int = 5) -> float:
    """Median seconds per call over ``repeats`` timed batches."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_time / 10:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def main() -> None:
    rows: list[tuple[str, float, float]] = []
    for msg in all_messages():
        data = encode(msg)
        cls = type(msg)
        base = per_call(lambda data=data: json.loads(data))
        ours = per_call(lambda cls=cls, data=data: decode(cls, data))
        rows.append((f"decode {cls.__name__} ({len(data)} B)", ours, base))
        as_dict = json.loads(data)
        base = per_call(lambda d=as_dict: json.dumps(d))
        ours = per_call(lambda m=msg: encode(m))
        rows.append((f"encode {cls.__name__}", ours, base))

    payload = bytes(range(256)) * 256  # 64 KiB
    frame = encode_chunk(Chunk("ab" * 16, hashlib.sha256(payload).hexdigest(), 0, len(payload), payload))
    rows.append(("decode_chunk 64 KiB", per_call(lambda: decode_chunk(frame)),
                 per_call(lambda: hashlib.sha256(payload).digest())))

    signed = next(m.bundle for m in all_messages() if getattr(m, "bundle", None) is not None)
    blob = encode_model(signed)
    pub = SIGNING_KEY.public_key()
    rows.append(("verify signed manifest", per_call(lambda: decode_signed_manifest(blob, pub)),
                 per_call(lambda: decode_model(SignedManifest, blob))))

    print(f"{'operation':42s} {'ours µs':>10s} {'baseline µs':>12s} {'ratio':>7s}")
    for name, ours, base in rows:
        print(f"{name:42s} {ours * 1e6:10.1f} {base * 1e6:12.1f} {ours / base:7.2f}")


if __name__ == "__main__":
    main()
