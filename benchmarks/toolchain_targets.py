"""Size, accuracy and single-sample latency of each artifact of two builds, relative to that build's fp32 ONNX
artifact measured in the same run: the digits bundle (8×8 grey images) and a vision bundle (MobileNetV3-Small at
width 0.5, trained from scratch on a generated image folder, 112×112 raw RGB in, resized to 96×96 in the graph).

Latency is measured round-robin (one call of each artifact in turn, many
rounds) so that machine noise hits every artifact alike; the figure is the
median of the per-call times. Where an int8 artifact is not faster than its
runtime's fp32 one, the report says what the runtime did with the int8 graph
(for ONNX Runtime: which operators still run in float between
Quantize/DequantizeLinear pairs after its graph optimisations, and where the
time goes: ONNX Runtime's own per-operator profile of the int8 and the fp32
session, one thread as the agent runs them, on the same test input) and
whether the CPU has int8 dot-product instructions (VNNI).

Run: ``make bench`` or ``python -m benchmarks.toolchain_targets [--bundle DIR] [--rounds N] [--vision-rounds N]
[--no-vision]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from agent.backends import open_backend
from protocol import Manifest, Precision, Target, decode_model, generate_signing_key, private_key_to_pem
from protocol.signing import SignedManifest
from toolchain.bundle import ARTIFACTS, MANIFEST
from toolchain.data import load_digits, split_indices
from toolchain.pipeline import BuildSpec, build
from toolchain.validate import validate

#: Integer kernels ONNX Runtime runs after fusing Q/DQ pairs (what makes int8 fast on a CPU).
_INT8_KERNELS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
                 "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QGemm", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear", "QLinearSoftmax", "QLinearReduceMean"}


def _key(tmp: Path) -> Path:
    key = tmp / "k"
    if not key.exists():
        key.write_bytes(private_key_to_pem(generate_signing_key()))
    return key


def _digits(path: Path | None, tmp: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    if path is None:
        print("building the digits bundle ...", flush=True)
        path = build(BuildSpec(recipe="digits", out=tmp / "digits", key=_key(tmp), tar=False)).out
    manifest = _manifest(path)
    ds = load_digits()
    test = split_indices(ds.y, int(manifest.lineage.get("seed", "0")))["test"]
    return path, ds.x[test], ds.y[test]


def _vision(tmp: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    from tests.vision_helpers import make_image_folder
    from toolchain.images import load_image_folder

    folder = make_image_folder(tmp / "images", per_class=80, size=(112, 112))
    print("building the vision bundle (MobileNetV3-Small x0.5, 112x112 -> 96x96, TFLite included) ...", flush=True)
    spec = BuildSpec(recipe="torch", out=tmp / "vision", key=_key(tmp), data=folder, tar=False, epochs=8,
                     model="toolchain.models:mobilenet_v3_small", model_args={"width_mult": 0.5}, max_drop=100.0,
                     device="cpu", input_size=(96, 96))
    t0 = time.perf_counter()
    result = build(spec)
    print(f"built in {time.perf_counter() - t0:.0f} s; skipped: {result.report.get('skipped') or 'nothing'}")
    ds = load_image_folder(folder)
    _, kept = validate(ds)
    test = kept[split_indices(ds.y[kept], int(result.manifest.lineage.get("seed", "0")))["test"]]
    return result.out, ds.x[test], ds.y[test]


def _manifest(root: Path) -> Manifest:
    return decode_model(SignedManifest, (root / MANIFEST).read_bytes()).manifest


def _vnni() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown CPU flags"
    found = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return f"CPU has {', '.join(found)}" if found else "CPU has no VNNI/AMX int8 dot-product instructions"


def _ort_int8_graph(path: Path, tmp: Path) -> str:
    """What ONNX Runtime runs for an int8 QDQ model after its optimisations: fused integer kernels, and the
    float operators still wrapped in DequantizeLinear → op → QuantizeLinear."""
    import onnx
    import onnxruntime as ort

    out = tmp / f"{path.name}.optimized.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    fused = sum(c for op, c in ops.items() if op in _INT8_KERNELS)
    qdq = ops["QuantizeLinear"] + ops["DequantizeLinear"]
    floats = {op: c for op, c in ops.items() if op not in _INT8_KERNELS and op not in ("QuantizeLinear",
                                                                                       "DequantizeLinear")}
    top = ", ".join(f"{op} {c}" for op, c in sorted(floats.items(), key=lambda kv: -kv[1])[:6])
    why = (f"after ORT's optimisations {fused} ops run as int8 kernels, {qdq} Quantize/DequantizeLinear remain, "
           f"float ops in between: {top}")
    if "HardSigmoid" in floats:
        why += (" (ONNX Runtime has no integer HardSigmoid, the hard-swish and squeeze-excite gates: each runs in "
                "float between a DequantizeLinear and a QuantizeLinear)")
    if "Conv" in floats:
        why += f" ({floats['Conv']} convolutions were not fused into QLinearConv and dequantize their weights per call)"
    return why


def _ort_profile(path: Path, x: np.ndarray, tmp: Path, runs: int = 200) -> dict[str, float]:
    """µs per call spent in each operator type, from ONNX Runtime's profiler (one thread, the agent's default;
    the default graph optimisations, as the agent's session has them)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / f"{path.name}.profile")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.astype(np.float32)}
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    warm = calls[len(calls) // 5][1]  # the first fifth of the calls warm the caches and are left out
    spent: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and e["ts"] > warm:
            spent[e["args"]["op_name"]] += e["dur"]
    counted = len(calls) - len(calls) // 5 - 1
    return {op: us / counted for op, us in spent.items()}


def _ort_int8_profile(int8: Path, fp32: Path, x: np.ndarray, tmp: Path) -> str:
    """Where an int8 call's kernel time goes, by kind of operator, and the fp32 call's biggest operators."""
    q, f = _ort_profile(int8, x, tmp), _ort_profile(fp32, x, tmp)
    total = sum(q.values())
    qdq = sum(v for op, v in q.items() if op in ("QuantizeLinear", "DequantizeLinear"))
    kernels = sum(v for op, v in q.items() if op in _INT8_KERNELS)
    top = ", ".join(f"{op} {v / total:.0%}" for op, v in sorted(q.items(), key=lambda kv: -kv[1])[:5])
    return (f"ORT's profile (shares of kernel time, wall clock, so only the shares mean anything on a shared "
            f"machine): in the int8 call integer kernels take {kernels / total:.0%}, Quantize/DequantizeLinear "
            f"{qdq / total:.0%}, float operators {(total - kernels - qdq) / total:.0%} (top: {top}); fp32's top: "
            + ", ".join(f"{op} {v / sum(f.values()):.0%}" for op, v in sorted(f.items(), key=lambda kv: -kv[1])[:3]))


def _tflite_int8_graph(int8: Path, fp32: Path) -> str:
    """How much of an int8 TFLite model still runs in float: the QUANTIZE/DEQUANTIZE ops the converter added
    between int8 and float sections, against the fp32 model's op count."""
    from ai_edge_litert.interpreter import Interpreter

    def ops(path: Path) -> Counter[str]:
        return Counter(o["op_name"] for o in Interpreter(model_path=str(path))._get_ops_details())

    q, f = ops(int8), ops(fp32)
    return (f"the int8 graph has {sum(q.values())} ops against fp32's {sum(f.values())}: {q['QUANTIZE']} QUANTIZE "
            f"and {q['DEQUANTIZE']} DEQUANTIZE switch between int8 and float sections (around "
            f"{', '.join(op for op in ('HARD_SWISH', 'MUL', 'MEAN', 'ADD') if q[op])})")


def _report(title: str, root: Path, x: np.ndarray, y: np.ndarray, rounds: int, tmp: Path) -> None:
    manifest = _manifest(root)
    arts = [a for a in manifest.artifacts if a.target is not Target.TENSORRT]
    backends = {a.name: open_backend(root / ARTIFACTS / a.sha256,
                                     "onnxruntime" if a.target is Target.ONNX else "ai-edge-litert")
                for a in arts}
    accuracy = {n: float((np.concatenate([b.predict(x[i : i + 1]) for i in range(len(x))]).argmax(1) == y).mean())
                for n, b in backends.items()}
    times: dict[str, list[float]] = {n: [] for n in backends}
    for r in range(rounds):
        sample = x[r % len(x) : r % len(x) + 1]
        for n, b in backends.items():
            t0 = time.perf_counter()
            b.predict(sample)
            times[n].append(time.perf_counter() - t0)
    warm = min(100, rounds // 10)
    lat = {n: statistics.median(t[warm:]) for n, t in times.items()}
    base = next(a for a in arts if a.target is Target.ONNX and a.precision is Precision.FP32)
    print(f"\n{title} ({len(x)} test inputs shaped {list(x.shape[1:])})")
    print(f"{'artifact':26s} {'size B':>9s} {'size×':>6s} {'accuracy':>9s} {'Δ pts':>6s} "
          f"{'p50 µs':>9s} {'latency×':>9s}")
    for a in arts:
        print(f"{a.name:26s} {a.size:9d} {a.size / base.size:6.2f} {accuracy[a.name]:9.4f} "
              f"{(accuracy[a.name] - accuracy[base.name]) * 100:+6.2f} {lat[a.name] * 1e6:9.1f} "
              f"{lat[a.name] / lat[base.name]:9.2f}")
    print(f"baseline: {base.name}, {rounds} rounds, median of per-call times; ratios < 1 are smaller/faster")
    for target in (Target.ONNX, Target.TFLITE):
        fp32 = next((a for a in arts if a.target is target and a.precision is Precision.FP32), None)
        int8 = next((a for a in arts if a.target is target and a.precision is Precision.INT8), None)
        if fp32 is None or int8 is None:
            continue
        ratio = lat[int8.name] / lat[fp32.name]
        verdict = "faster" if ratio < 1 else "NOT faster"
        line = f"{target.value}: int8 is {verdict} than fp32 ({ratio:.2f}×)"
        if ratio >= 1:
            why = [_vnni()]
            if target is Target.ONNX:
                why.append(_ort_int8_graph(root / ARTIFACTS / int8.sha256, tmp))
                why.append(_ort_int8_profile(root / ARTIFACTS / int8.sha256, root / ARTIFACTS / fp32.sha256,
                                             x[:1], tmp))
            else:
                why.append(_tflite_int8_graph(root / ARTIFACTS / int8.sha256, root / ARTIFACTS / fp32.sha256))
            line += "; why: " + "; ".join(why)
        print(line)
    for b in backends.values():
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, help="an existing digits bundle directory (default: build one)")
    ap.add_argument("--rounds", type=int, default=2000, help="round-robin rounds for the digits bundle")
    ap.add_argument("--vision-rounds", type=int, default=500, help="round-robin rounds for the vision bundle")
    ap.add_argument("--no-vision", action="store_true", help="measure the digits bundle only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root, x, y = _digits(args.bundle, tmp)
        _report("digits", root, x, y, args.rounds, tmp)
        if not args.no_vision:
            root, x, y = _vision(tmp)
            _report("vision: MobileNetV3-Small x0.5 from an image folder", root, x, y, args.vision_rounds, tmp)


if __name__ == "__main__":
    main()
