"""Export a torch model to ONNX (one self-contained file) and to TFLite with litert-torch."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolchain._quiet import quiet
from toolchain.errors import ConversionError

__all__ = ["export_onnx", "export_tflite", "onnx_opset", "torch_logits"]

log = logging.getLogger(__name__)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and warnings of their own; keep the CLI's output ours."""
    with quiet(("", "torch", "torchao", "litert_torch", "absl"), logging.ERROR):
        yield


def torch_logits(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.as_tensor(x[i : i + batch])).numpy())
    return np.concatenate(out).astype(np.float32)


def export_onnx(model: nn.Module, sample: np.ndarray, path: Path) -> None:
    """Export with a dynamic batch dimension, weights inside the file."""
    model.eval()
    example = torch.as_tensor(sample[:2] if len(sample) >= 2 else np.repeat(sample, 2, axis=0))
    try:
        with _quiet():
            program = torch.onnx.export(
                model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                external_data=False, dynamo=True, verbose=False,
            )
            if program is None:
                raise ConversionError("torch.onnx.export returned no program")
            program.save(str(path), external_data=False)
    except Exception as exc:
        raise ConversionError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ConversionError(f"exported ONNX model does not pass the checker: {exc}") from None


def onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def export_tflite(model: nn.Module, sample: np.ndarray, path: Path, *, int8_calibration: np.ndarray | None = None
                  ) -> None:
    """Convert to TFLite with litert-torch: fp32, or static int8 (PT2E, per-channel) with calibration data."""
    model.eval()
    example = (torch.as_tensor(sample[:1]),)
    try:
        with _quiet():
            import litert_torch

            if int8_calibration is None:
                edge = litert_torch.convert(model, example)
            else:
                from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
                from litert_torch.quantize.quant_config import QuantConfig
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

                quantizer = PT2EQuantizer().set_global(
                    get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
                )
                prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
                with torch.no_grad():
                    for row in int8_calibration:
                        prepared(torch.as_tensor(row[None]))
                converted = convert_pt2e(prepared, fold_quantize=False)
                edge = litert_torch.convert(converted, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
            edge.export(str(path))
    except Exception as exc:
        raise ConversionError(f"TFLite conversion failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                              ) from None
