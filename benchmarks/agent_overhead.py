"""What the agent costs on top of the bare runtime.

Latency: for the digits CNN and a larger MobileNet-style CNN
(depthwise-separable blocks, 3×128×128 input, random weights), exported to
ONNX here, ``Predictor.predict`` with statistics on against the bare ONNX
Runtime session (``session.run(None, {name: x})``, as a user of ONNX Runtime
calls it) in the same process, at batch 1 and batch 32. Calls alternate
(bare, agent, agent, bare, ...) so machine noise hits both alike; each round
gives a ratio of the two medians, and the figure is the median of the rounds'
ratios with their range.

Memory: resident set (VmRSS) of fresh interpreters, each measured several
times (median): the bare interpreter; the agent imported (``agent.runtime``,
no model); an agent constructed (``Agent(config)`` with its local API, not
connected: no broker); and, per model, the bare runtime holding the model
against the agent holding it (``agent.runtime`` imported, a ``Predictor``
with statistics on), both after the same four batches of 32 rows. The agent's
cost is the difference, and the ratio, to the bare runtime in the same run.

Run: ``make bench`` or ``python -m benchmarks.agent_overhead``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    encode_model,
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


ROUNDS = 5
ROUND_SECONDS = {1: 1.0, 32: 2.0}
RSS_REPEATS = 3


def _paired(fns: dict[str, Callable[[np.ndarray], object]], x: np.ndarray, seconds: float) -> dict[str, float]:
    """Median seconds per call of each function, calls alternating (the order flips every pair)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, fn in items:
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
        items.reverse()
    return {k: statistics.median(v[3:]) for k, v in times.items()}


_RSS = (
    "def rss():\n"
    "    # VmRSS of this process (ru_maxrss would include the forking parent's peak)\n"
    "    return next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmRSS:'))\n"
)
RSS_SNIPPETS = {
    "python": "pass",
    "agent imported": "import agent.runtime",
    "agent constructed": """
import socket, sys
from pathlib import Path
from agent.config import AgentConfig
from agent.runtime import Agent
from protocol import generate_signing_key, public_key_to_text
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
cfg = AgentConfig(device_id="bench", broker_url="mqtt://127.0.0.1:1", password="x", data_dir=Path(sys.argv[1]),
                  server_key=public_key_to_text(generate_signing_key().public_key()), api_port=port)
agent = Agent(cfg)
""",
    "bare runtime + model": """
import sys
import numpy as np
import onnxruntime as ort
opts = ort.SessionOptions()
opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
sess = ort.InferenceSession(sys.argv[1], sess_options=opts, providers=["CPUExecutionProvider"])
inp = sess.get_inputs()[0]
x = np.zeros((32, *[d if isinstance(d, int) else 1 for d in inp.shape[1:]]), np.float32)
for _ in range(4):
    sess.run(None, {inp.name: x})
""",
    "agent + model": """
import sys
from pathlib import Path
import agent.runtime
from agent.predictor import Predictor
from protocol import Manifest, decode_model
import numpy as np
m = decode_model(Manifest, Path(sys.argv[2]).read_bytes())
pred = Predictor(Path(sys.argv[1]), m, m.artifacts[0])
x = np.zeros((32, *[d if d > 0 else 1 for d in pred.input_shape[1:]]), np.float32)
for _ in range(4):
    pred.predict(x)
pred.flush()
""",
}


def _rss_mib(what: str, *args: str) -> float:
    """Median VmRSS (MiB) of fresh interpreters running ``RSS_SNIPPETS[what]``."""
    code = RSS_SNIPPETS[what] + "\n" + _RSS + "print(rss())\n"
    runs = [int(subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
                .stdout.split()[-1]) / 1024 for _ in range(RSS_REPEATS)]
    return statistics.median(runs)


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cases = [("digits CNN 1x8x8", DigitsCNN(), (1, 8, 8), 16.0), ("MobileNet-ish 3x128x128", MobileNetish(),
                                                                   (3, 128, 128), 1.0)]
    print(f"latency: median of {ROUNDS} rounds (range), each the agent's median over the bare runtime's")
    print(f"{'model':26s} {'batch':>5s} {'bare µs':>10s} {'agent µs':>10s} {'overhead':>9s}  range")
    with tempfile.TemporaryDirectory() as tmp:
        models: list[tuple[str, Path, Path]] = []
        for name, net, shape, scale in cases:
            net.eval()
            sample = (rng.random((64, *shape)) * scale).astype(np.float32)
            path = Path(tmp) / f"{len(models)}.onnx"
            export_onnx(net, sample, path)
            manifest, art = _manifest(path, sample, "image")
            manifest_file = path.with_suffix(".json")
            manifest_file.write_bytes(encode_model(manifest))
            models.append((name, path, manifest_file))
            pred = Predictor(path, manifest, art)
            session = pred.backend.session  # type: ignore[attr-defined]
            in_name = pred.backend.input.name

            def bare(v: np.ndarray, s: Any = session, n: str = in_name) -> object:
                return s.run(None, {n: v})

            for batch in (1, 32):
                x = sample[:batch]
                rounds = [_paired({"bare": bare, "agent": pred.predict}, x, ROUND_SECONDS[batch])
                          for _ in range(ROUNDS)]
                ratios = [r["agent"] / r["bare"] - 1 for r in rounds]
                bare_us = statistics.median(r["bare"] for r in rounds) * 1e6
                agent_us = statistics.median(r["agent"] for r in rounds) * 1e6
                print(f"{name:26s} {batch:5d} {bare_us:10.1f} {agent_us:10.1f} "
                      f"{statistics.median(ratios) * 100:+8.1f}%  [{min(ratios) * 100:+.1f}%, "
                      f"{max(ratios) * 100:+.1f}%]")
            pred.close()
        data = Path(tmp) / "agent-data"
        python = _rss_mib("python")
        idle = _rss_mib("agent imported")
        built = _rss_mib("agent constructed", str(data))
        print(f"\nRSS, median of {RSS_REPEATS} fresh interpreters: python {python:.0f} MiB; agent imported, no "
              f"model {idle:.0f} MiB; agent constructed (local API on, no broker) {built:.0f} MiB")
        for name, path, manifest_file in models:
            bare_rss = _rss_mib("bare runtime + model", str(path))
            agent_rss = _rss_mib("agent + model", str(path), str(manifest_file))
            print(f"{name:26s} bare runtime {bare_rss:.0f} MiB, agent {agent_rss:.0f} MiB: "
                  f"+{agent_rss - bare_rss:.0f} MiB (x{agent_rss / bare_rss:.2f})")


if __name__ == "__main__":
    main()
