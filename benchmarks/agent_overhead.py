"""What the agent costs on top of the bare runtime.

For the digits CNN and a larger MobileNet-style CNN (depthwise-separable
blocks, 3×128×128 input, random weights), exported to ONNX here: median
per-call latency of ``Predictor.predict`` with statistics on, against the
bare ONNX Runtime session in the same process, at batch 1 and batch 32
(calls interleaved so machine noise hits both alike). Then the resident
memory of an idle agent process (imports only) and of one with the model
loaded, each measured in a fresh interpreter.

Run: ``make bench`` or ``python -m benchmarks.agent_overhead``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agent.predictor import Predictor
from protocol import (
    ArtifactEntry,
    FeatureReference,
    Manifest,
    Precision,
    ReferenceProfile,
    RuntimeRequirement,
    Target,
    TensorSpec,
)
from toolchain.export import export_onnx
from toolchain.models import DigitsCNN
from toolchain.profile import feature_matrix, quantile_edges


def _block(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
    )


class MobileNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        chans = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.blocks = nn.Sequential(*[_block(a, b, s) for a, b, s in chans])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(self.stem(x)))
        return out


def _manifest(path: Path, x: np.ndarray, kind: str) -> tuple[Manifest, ArtifactEntry]:
    feats, names = feature_matrix(x, kind)
    refs = [FeatureReference(name=n, edges=quantile_edges(feats[:, j], 10), counts=[1] * (len(
        quantile_edges(feats[:, j], 10)) - 1), mean=0.0, std=1.0) for j, n in enumerate(names)]
    ref = ReferenceProfile(kind="image", summaries="image-summaries/1", n=len(x), features=refs,
                           confidence_edges=[0.0, 0.5, 1.0], confidence_counts=[1, 1])
    shape = [-1, *x.shape[1:]]
    art = ArtifactEntry(name="m", target=Target.ONNX, precision=Precision.FP32, sha256="0" * 64,
                        size=path.stat().st_size, runtime=RuntimeRequirement(name="onnxruntime", min_version="1.17"),
                        inputs=[TensorSpec(name="input", shape=shape, dtype="float32")],
                        outputs=[TensorSpec(name="logits", shape=[-1, 10], dtype="float32")])
    from datetime import datetime, timezone

    m = Manifest(model="bench", version="1", created_at=datetime.now(timezone.utc), task="classification",
                 labels=[str(i) for i in range(10)], artifacts=[art], reference=ref)
    return m, art


def _interleaved(fns: dict[str, object], x: np.ndarray, seconds: float) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)  # type: ignore[operator]
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v[5:]) for k, v in times.items()}


RSS_SNIPPET = """
import sys
from pathlib import Path
import agent.runtime
if len(sys.argv) > 1:
    from agent.backends import open_backend
    b = open_backend(Path(sys.argv[1]), "onnxruntime")
    import numpy as np
    b.predict(np.zeros((1, *[d if d > 0 else 1 for d in b.input.shape[1:]]), np.float32))
# VmRSS of this process (ru_maxrss would include the forking parent's peak)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS:")))
"""


def _rss_mib(model: Path | None) -> float:
    args = [sys.executable, "-c", RSS_SNIPPET] + ([str(model)] if model else [])
    return int(subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()[-1]) / 1024


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cases = [("digits CNN 1x8x8", DigitsCNN(), (1, 8, 8), 16.0), ("MobileNet-ish 3x128x128", MobileNetish(),
                                                                   (3, 128, 128), 1.0)]
    print(f"{'model':26s} {'batch':>5s} {'bare µs':>10s} {'agent µs':>10s} {'overhead':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, net, shape, scale in cases:
            net.eval()
            sample = (rng.random((64, *shape)) * scale).astype(np.float32)
            path = Path(tmp) / f"{len(paths)}.onnx"
            export_onnx(net, sample, path)
            paths.append(path)
            manifest, art = _manifest(path, sample, "image")
            pred = Predictor(path, manifest, art)
            bare = pred.backend.session
            in_name = pred.backend.input.name
            for batch in (1, 32):
                x = sample[:batch] if batch <= len(sample) else sample
                res = _interleaved({"bare": lambda v, s=bare, n=in_name: s.run(None, {n: v}),
                                    "agent": pred.predict}, x,
                                   seconds=4.0 if batch == 1 else 6.0)
                print(f"{name:26s} {batch:5d} {res['bare'] * 1e6:10.1f} {res['agent'] * 1e6:10.1f} "
                      f"{(res['agent'] / res['bare'] - 1) * 100:+8.1f}%")
            pred.close()
        idle = _rss_mib(None)
        print(f"\nagent RSS: idle (agent imported) {idle:.0f} MiB; "
              + "; ".join(f"with {cases[i][0]} loaded {_rss_mib(p):.0f} MiB" for i, p in enumerate(paths)))


if __name__ == "__main__":
    main()
