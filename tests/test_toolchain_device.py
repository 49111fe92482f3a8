"""Training on a CUDA GPU when there is one (``--device auto|cpu|cuda``), with the seeded results of the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.toolchain_helpers import blobs
from toolchain.errors import TrainingError
from toolchain.models import TabularMLP
from toolchain.train import TrainConfig, resolve_device, train

NO_CUDA = "no CUDA GPU is visible to torch here (the CPU wheel, or no GPU); this runs where one is"


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TrainingError, match="choose auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no CUDA GPU is visible"):
            resolve_device("cuda")


def _trained(device: str, tmp_path) -> tuple[torch.nn.Module, list[float]]:
    x, y = blobs(900)
    torch.manual_seed(0)
    model = TabularMLP(4, 3)
    result = train(model, (x[:600], y[:600]), (x[600:], y[600:]), TrainConfig(epochs=8, seed=0),
                   tmp_path / device, data_digest="blobs", device=device)
    assert next(model.parameters()).device.type == "cpu"  # handed back on the CPU, for export
    return model, [h.val_accuracy for h in result.history]


def test_a_cpu_run_is_repeatable(tmp_path):
    a, acc_a = _trained("cpu", tmp_path / "a")
    b, acc_b = _trained("cpu", tmp_path / "b")
    assert acc_a == acc_b
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_training_gives_the_seeded_cpu_results_within_tolerance(tmp_path):
    cpu, acc_cpu = _trained("cpu", tmp_path / "cpu")
    gpu, acc_gpu = _trained("cuda", tmp_path / "cuda")
    assert np.allclose(acc_cpu, acc_gpu, atol=0.01)
    x, _ = blobs(900)
    with torch.no_grad():
        out_cpu, out_gpu = cpu(torch.as_tensor(x)), gpu(torch.as_tensor(x))
    assert torch.allclose(out_cpu, out_gpu, atol=1e-3, rtol=1e-3)
    assert (out_cpu.argmax(1) == out_gpu.argmax(1)).float().mean() >= 0.995
