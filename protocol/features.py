"""Feature definitions: one declared transformation from raw input columns, run the same way everywhere.

A :class:`FeatureDefinition` names a feature, its version, unit, valid range,
allowed missing rate and owner, and a transformation from raw columns in a
small vocabulary (:data:`Transform`): ``identity``, ``scale``, ``clip``,
``log1p``, ``ratio``, ``onehot`` and ``window`` (a summary of the samples
of a sensor stream's window that a row carries). The same definition is executed

- in numpy (``agent.features``: ``model_columns``, ``feature_values``): by
  the toolchain to validate and profile training data, and by the agent to
  count what a device sees, keyed by feature name and version;
- as a torch module compiled into the exported ONNX/TFLite graph
  (``toolchain.features.FeatureTransform``), so devices feed raw columns and
  the model cannot be fed a feature computed another way.

Both run in float32 with the same operations in the same order; a test holds
them to 1e-6 on every row. A definition is immutable once registered: a
changed transformation is a new ``version``.

Missing values (NaN) in a raw column stay missing through the transformation;
the model's input gets ``fill`` in their place, and the statistics count them
as missing. ``onehot`` yields one model column per declared category; its
statistic is the category's index (a value outside the set is missing).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from protocol._model import WireModel, encode_model
from protocol.canonical import sha256_hex
from protocol.ids import Name

__all__ = [
    "MAX_FEATURE_DEFINITIONS",
    "Clip",
    "FeatureDefinition",
    "FeatureSet",
    "Identity",
    "Log1p",
    "OneHot",
    "Ratio",
    "Scale",
    "Transform",
    "Window",
    "definition_sha256",
]

MAX_FEATURE_DEFINITIONS = 256
Short = Annotated[str, Field(max_length=256)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Identity(WireModel):
    op: Literal["identity"]
    column: Name


class Scale(WireModel):
    """``(x - offset) * factor``."""

    op: Literal["scale"]
    column: Name
    offset: Finite = 0.0
    factor: Finite = 1.0


class Clip(WireModel):
    """``x`` limited to ``[min, max]``."""

    op: Literal["clip"]
    column: Name
    min: Finite
    max: Finite

    @model_validator(mode="after")
    def _order(self) -> Clip:
        if self.min > self.max:
            raise ValueError(f"clip: min {self.min} is above max {self.max}")
        return self


class Log1p(WireModel):
    """``log(1 + max(x, 0))``: negative values count as 0."""

    op: Literal["log1p"]
    column: Name


class Ratio(WireModel):
    """``numerator / denominator``; missing where ``|denominator| < eps``."""

    op: Literal["ratio"]
    numerator: Name
    denominator: Name
    eps: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-6


class OneHot(WireModel):
    """One model column per category: 1 where ``x`` equals it, else 0. Categories are numeric codes."""

    op: Literal["onehot"]
    column: Name
    categories: list[Finite] = Field(min_length=2, max_length=64)
    #: Names of the categories (optional, for people), one per code.
    names: list[Short] | None = None

    @model_validator(mode="after")
    def _distinct(self) -> OneHot:
        import struct

        # compared in float32, as the model and the statistics compare them: distinct there, and exact
        as_f32 = [struct.unpack("<f", struct.pack("<f", c))[0] for c in self.categories]
        if len(set(as_f32)) != len(as_f32):
            raise ValueError("onehot: categories must be distinct as 32-bit floats")
        if any(abs(c) > 2**24 for c in self.categories):
            raise ValueError("onehot: category codes are at most 2**24 in size (exact in 32-bit floats)")
        if self.names is not None and len(self.names) != len(self.categories):
            raise ValueError("onehot: give one name per category, or none")
        return self


class Window(WireModel):
    """A summary over a window of samples a row carries (a sensor stream's last ``len(columns)`` readings,
    oldest first): ``mean``, ``std`` (population), ``rms``, ``min``, ``max`` or ``range`` (max - min). Missing
    when any sample of the row's window is."""

    op: Literal["window"]
    columns: list[Name] = Field(min_length=2, max_length=256)
    stat: Literal["mean", "std", "rms", "min", "max", "range"]

    @model_validator(mode="after")
    def _distinct(self) -> Window:
        if len(set(self.columns)) != len(self.columns):
            raise ValueError("window: columns must be distinct")
        return self


Transform = Annotated[Identity | Scale | Clip | Log1p | Ratio | OneHot | Window, Field(discriminator="op")]


class FeatureDefinition(WireModel):
    name: Name
    version: Annotated[int, Field(ge=1, le=1_000_000)]
    dtype: Literal["float", "int", "category"] = "float"
    unit: Short = ""
    #: Valid range of the feature's value (not for onehot, whose values are its categories). Data outside it
    #: violates the definition; the feature's drift bins split it evenly, so fleets and model versions share them.
    min: Finite | None = None
    max: Finite | None = None
    #: Share of rows (0-1) that may be missing (NaN in a raw column, or a zero denominator).
    max_missing: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: What a build does when data breaks the range or the missing rate: stop, or warn and go on.
    on_violation: Literal["fatal", "warn"] = "fatal"
    #: Share of rows (0-1) that may fall outside [min, max] before it is a violation.
    max_out_of_range: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: Value the model's input gets where the feature is missing.
    fill: Finite = 0.0
    bins: Annotated[int, Field(ge=2, le=64)] = 10
    description: Annotated[str, Field(max_length=2000)] = ""
    owner: Short = ""
    transform: Transform

    @model_validator(mode="after")
    def _range(self) -> FeatureDefinition:
        if isinstance(self.transform, OneHot):
            if self.dtype != "category":
                raise ValueError(f"feature {self.name}: an onehot feature has dtype 'category'")
            if self.min is not None or self.max is not None:
                raise ValueError(f"feature {self.name}: an onehot feature's values are its categories; "
                                 "give no min or max")
            return self
        if self.dtype == "category":
            raise ValueError(f"feature {self.name}: dtype 'category' goes with the onehot transform")
        if self.min is None or self.max is None:
            raise ValueError(f"feature {self.name}: give its valid range, min and max")
        if not self.min < self.max:
            raise ValueError(f"feature {self.name}: min {self.min} must be below max {self.max}")
        return self

    @property
    def bounds(self) -> tuple[float, float]:
        """The valid range of its value (for onehot, of the category index)."""
        if isinstance(self.transform, OneHot):
            return 0.0, float(len(self.transform.categories) - 1)
        assert self.min is not None and self.max is not None  # noqa: S101 - checked by the validator
        return self.min, self.max

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def columns(self) -> list[str]:
        """The raw columns it reads."""
        t = self.transform
        if isinstance(t, Window):
            return list(t.columns)
        return [t.numerator, t.denominator] if isinstance(t, Ratio) else [t.column]


def definition_sha256(d: FeatureDefinition) -> str:
    """Content address of a definition: the sha256 of its canonical JSON."""
    return sha256_hex(encode_model(d))


class FeatureSet(WireModel):
    """The features a model consumes: the raw columns of its input, in order, and the definitions."""

    inputs: list[Name] = Field(min_length=1, max_length=1024)
    definitions: list[FeatureDefinition] = Field(min_length=1, max_length=MAX_FEATURE_DEFINITIONS)

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSet:
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError("inputs: raw column names must be unique")
        names = [d.name for d in self.definitions]
        if len(set(names)) != len(names):
            raise ValueError("a model consumes one version of each feature")
        missing = sorted({c for d in self.definitions for c in d.columns} - set(self.inputs))
        if missing:
            raise ValueError(f"features read columns that are not inputs: {', '.join(missing)}")
        return self
