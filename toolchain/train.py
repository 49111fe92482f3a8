"""Seeded training, on the CPU or a CUDA GPU, with a checkpoint after every epoch and resume.

``device``: ``cpu``, ``cuda`` (fails when no CUDA GPU is visible) or ``auto``
(the GPU when there is one). Shuffling comes from a CPU generator either way,
so a seed gives the same batches on both; the arithmetic differs in the last
bits (cuDNN/cuBLAS kernels), so results agree within a tolerance, not
bit for bit. The trained model is handed back on the CPU, for export.

The checkpoint (``last.pt`` in the work directory, written atomically) holds
the weights, optimiser state, the shuffling generator's state, the epoch and
the history, plus a fingerprint of the run (config and data digest): resuming
continues exactly where the run stopped and refuses a checkpoint of another
run.

A classifier learns with cross-entropy on class ids. A regression model
(``TrainConfig.task``) outputs the target in its own units (the model
de-standardises inside its graph, :class:`toolchain.regression.Destandardized`);
it learns with the mean squared error divided by the training target's
variance, which is the MSE on the standardised target, so the learning rate
means the same whatever the target's scale.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolchain.errors import TrainingError

__all__ = ["EpochResult", "TrainConfig", "TrainResult", "device_name", "resolve_device", "train"]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    task: str = "classification"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise TrainingError(f"epochs, batch size and learning rate must be positive: {self}")
        if self.task not in ("classification", "regression"):
            raise TrainingError(f"task must be classification or regression, got {self.task!r}")


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    loss: float
    val_accuracy: float | None  # None for regression
    val_mae: float | None = None  # regression only, in the target's units


@dataclass
class TrainResult:
    history: list[EpochResult] = field(default_factory=list)
    resumed_from: int = 0


def resolve_device(device: str) -> torch.device:
    """``auto`` → the CUDA GPU when one is visible, else the CPU; ``cuda`` without one is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise TrainingError(f"--device {device!r}: choose auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False; "
                            "a CPU-only torch build, or no driver); use --device auto or cpu")
    return torch.device("cuda")


def device_name(device: torch.device) -> str:
    """What the lineage records: ``cpu``, or ``cuda:<GPU name>``."""
    return "cpu" if device.type == "cpu" else f"cuda:{torch.cuda.get_device_name(device)}"


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _mae(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x) - y).abs().mean())


def _fingerprint(cfg: TrainConfig, data_digest: str, model: nn.Module) -> str:
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    settings = asdict(cfg)
    if settings["task"] == "classification":  # as before the task existed: earlier checkpoints still resume
        del settings["task"]
    blob = json.dumps({"cfg": settings, "data": data_digest, "shapes": shapes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _save(path: Path, state: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def train(
    model: nn.Module,
    train_xy: tuple[np.ndarray, np.ndarray],
    val_xy: tuple[np.ndarray, np.ndarray],
    cfg: TrainConfig,
    workdir: Path,
    *,
    data_digest: str,
    resume: bool = False,
    on_epoch: Callable[[EpochResult], None] | None = None,
    device: str = "cpu",
) -> TrainResult:
    """Train ``model`` in place on ``device``; checkpoint to ``workdir/last.pt`` after every epoch."""
    dev = resolve_device(device)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "last.pt"
    fingerprint = _fingerprint(cfg, data_digest, model)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = TrainResult()
    start = 0
    if ckpt.exists():
        if not resume:
            raise TrainingError(
                f"{ckpt} holds a checkpoint of an earlier run; pass --resume to continue it, "
                f"or remove {workdir} to start over"
            )
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != fingerprint:
            raise TrainingError(f"{ckpt} belongs to a run with other settings or data; remove {workdir} to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        result.history = [EpochResult(**h) for h in state["history"]]
        start = result.resumed_from = int(state["epoch"])
    x = torch.as_tensor(train_xy[0]).to(dev)
    xv = torch.as_tensor(val_xy[0]).to(dev)
    regression = cfg.task == "regression"
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if regression:  # (n, 1) float32 targets; the loss is the MSE on the standardised target (see above)
        y = torch.as_tensor(np.asarray(train_xy[1], dtype=np.float32).reshape(len(train_xy[1]), -1)).to(dev)
        yv = torch.as_tensor(np.asarray(val_xy[1], dtype=np.float32).reshape(len(val_xy[1]), -1)).to(dev)
        var = float(np.var(np.asarray(train_xy[1], dtype=np.float64))) or 1.0
        mse = nn.MSELoss()

        def scaled_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            loss: torch.Tensor = mse(out, target) / var
            return loss

        loss_fn = scaled_mse
    else:
        y = torch.as_tensor(train_xy[1]).to(dev)
        yv = torch.as_tensor(val_xy[1]).to(dev)
        loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start + 1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen).to(dev)
        total = 0.0
        for i in range(0, len(x), cfg.batch_size):
            batch = order[i : i + cfg.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        res = (EpochResult(epoch, total / len(x), None, _mae(model, xv, yv)) if regression
               else EpochResult(epoch, total / len(x), _accuracy(model, xv, yv)))
        result.history.append(res)
        _save(ckpt, {
            "fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(), "optim": opt.state_dict(),
            "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": [asdict(h) for h in result.history],
        })
        if on_epoch is not None:
            on_epoch(res)
    model.to("cpu")
    model.eval()
    return result
