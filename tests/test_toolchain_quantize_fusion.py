"""The int8 ONNX artifact is one ONNX Runtime can run with integer kernels: after ORT's graph optimisations every
convolution of a MobileNetV3 (hard-swish and squeeze-excite blocks included) is a QLinearConv, none a float Conv
dequantizing its weights on every call (what int8 activations, "S8S8", left behind: toolchain/quantize.py), and
the int8 model still agrees with the fp32 one."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


def _optimised_ops(path, out) -> Counter[str]:  # type: ignore[no-untyped-def]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def test_every_convolution_of_a_mobilenet_runs_as_an_int8_kernel(tmp_path):
    from toolchain.export import export_onnx
    from toolchain.models import mobilenet_v3_small
    from toolchain.quantize import quantize_onnx

    torch.manual_seed(0)
    model = mobilenet_v3_small(num_classes=4, width_mult=0.25)
    x = np.random.default_rng(0).random((32, 3, 64, 64), dtype=np.float32)
    model.train()
    with torch.no_grad():  # batch-norm statistics of the data, so activations have realistic ranges
        for _ in range(3):
            model(torch.from_numpy(x))
    model.eval()
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(model, x[:1], fp32)
    quantize_onnx(fp32, int8, x)

    convs = sum(n.op_type == "Conv" for n in onnx.load(str(fp32)).graph.node)
    ops = _optimised_ops(int8, tmp_path / "int8.opt.onnx")
    assert convs > 20 and ops["QLinearConv"] == convs and ops["Conv"] == 0, ops

    name = onnx.load(str(fp32)).graph.input[0].name
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    got = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    diff = float(np.abs(ref - got).max())
    scale = float(np.abs(ref).max())
    print(f"int8 against fp32 on {len(x)} inputs: top-1 agreement {agree:.3f}, max abs diff {diff:.4g} "
          f"(outputs up to {scale:.4g})")
    assert diff <= 0.25 * scale and agree >= 0.75
