"""What a build is asked to do: :class:`BuildSpec` (the CLI's flags, the API's job), shared by the pipeline and
the modules that load its data and make its model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = ["BuildSpec", "NullReporter", "Recipe", "Reporter"]

Recipe = Literal["digits", "tabular", "torch", "onnx"]


@dataclass
class BuildSpec:
    recipe: Recipe
    out: Path
    key: Path
    data: Path | None = None
    schema: Path | None = None
    #: SQLAlchemy URL to read the table from with ``query``, instead of ``data`` (a table: needs ``schema``).
    #: Left out of repr: it may hold a password.
    sql: str | None = field(default=None, repr=False)
    #: The one SELECT that yields the table from ``sql``; give it an ORDER BY for a reproducible build.
    query: str | None = None
    model: str | None = None
    weights: Path | None = None
    onnx: Path | None = None
    #: The output of ``onnx`` the build evaluates and ships (default: the per-class scores output; a ZipMap output
    #: becomes the tensor that feeds it). See toolchain/onnx_input.py.
    output: str | None = None
    name: str | None = None
    version: str = "1.0.0"
    description: str = ""
    author: str | None = None
    parent: str | None = None
    seed: int = 0
    epochs: int | None = None
    max_drop: float = 1.0
    resume: bool = False
    work_dir: Path | None = None
    tar: bool = True
    tflite: bool = True
    #: Feature definitions (a TOML file or a directory of them) for a schema naming ``registry_features``.
    features: Path | None = None
    #: Where to train: auto (a CUDA GPU when there is one), cpu or cuda.
    device: str = "auto"
    #: Fail the build when the worst slice (segment value with >= quality.MIN_SLICE_COUNT test rows) has a
    #: lower fp32 accuracy than this (0–1). Needs ``segments`` in the table's schema.
    min_slice_metric: float | None = None
    #: Shuffles per feature for permutation importance (tabular inputs only).
    importance_repeats: int = 5
    #: Keyword arguments for ``model`` when it names a constructor (``--model-arg KEY=VALUE``).
    model_args: dict[str, Any] = field(default_factory=dict)
    #: (height, width) every image of an image-folder dataset is brought to, raw pixels (``--image-size``).
    image_size: tuple[int, int] | None = None
    #: (height, width) the network takes, when the image recipe resizes the capture in the graph (``--input-size``).
    input_size: tuple[int, int] | None = None

    @property
    def workdir(self) -> Path:
        return self.work_dir or self.out.parent / f".{self.out.name}.work"


class Reporter(Protocol):
    def step(self, title: str, total: int | None = None) -> Any:
        """Context manager for one step; the yielded object has ``advance(n=1)`` and ``note(text)``."""

    def info(self, text: str) -> None: ...


class _NullStep:
    def advance(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class NullReporter:
    def __init__(self) -> None:
        self.steps: list[str] = []

    @contextmanager
    def step(self, title: str, total: int | None = None) -> Iterator[_NullStep]:
        self.steps.append(title)
        yield _NullStep()

    def info(self, text: str) -> None:
        pass
