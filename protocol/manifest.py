"""The artifact manifest: what a bundle contains and what it needs to run.

A bundle is one model version compiled for one or more targets. The manifest
lists each artifact by content address (sha256) with the runtime it needs,
golden vectors for the device's smoke test, and the reference profile from the
training data that drift detection compares against. It is signed as a whole
(:mod:`protocol.signing`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import Enum
from itertools import pairwise
from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, Field, StringConstraints, model_validator

from protocol._model import WireModel, wire_bytes
from protocol.canonical import sha256_hex
from protocol.features import FeatureSet
from protocol.ids import Name, Sha256Hex, Version

__all__ = [
    "GOLDEN_VALUES_2",
    "GOLDEN_VALUES_3",
    "MANIFEST_SCHEMA",
    "MANIFEST_SCHEMA_2",
    "MANIFEST_SCHEMA_3",
    "ArtifactEntry",
    "FeatureReference",
    "GoldenSet",
    "Manifest",
    "Precision",
    "Preprocessing",
    "ReferenceProfile",
    "RuntimeRequirement",
    "ShapeRange",
    "SmokeExpectation",
    "Target",
    "TensorRTBuild",
    "TensorSpec",
    "manifest_digest",
    "schema_for",
    "version_tuple",
]

MANIFEST_SCHEMA: Literal["edgeherd.manifest/1"] = "edgeherd.manifest/1"
#: The schema of a manifest whose reference profile uses the fields added after /1 (``FeatureReference.kind``,
#: ``nan``, ``outside``): an agent that speaks only /1 refuses it, naming the schema, instead of an unknown field.
MANIFEST_SCHEMA_2: Literal["edgeherd.manifest/2"] = "edgeherd.manifest/2"
#: The schema of a manifest whose reference profile has ``output_edges`` (a regression model's output bins), or
#: whose golden inputs hold more than :data:`GOLDEN_VALUES_2` values each (an image model's raw pixels): an agent
#: that speaks only /1 and /2 refuses it, naming the schema.
MANIFEST_SCHEMA_3: Literal["edgeherd.manifest/3"] = "edgeherd.manifest/3"
ManifestSchema = Literal["edgeherd.manifest/1", "edgeherd.manifest/2", "edgeherd.manifest/3"]
MAX_ARTIFACT_BYTES = 4 * 1024**3
#: Values in one golden input up to schema /2, and from /3 on (a 128×128 RGB image is 49,152).
GOLDEN_VALUES_2 = 16_384
GOLDEN_VALUES_3 = 65_536
MAX_FEATURES = 1024
MAX_BINS = 64

ShortText = Annotated[str, StringConstraints(max_length=256)]
Text = Annotated[str, StringConstraints(max_length=4000)]


class Target(str, Enum):
    """Compilation target, i.e. which runtime family loads the artifact."""

    ONNX = "onnx"
    TFLITE = "tflite"
    TENSORRT = "tensorrt"


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


RuntimeName = Literal["onnxruntime", "ai-edge-litert", "tflite-runtime", "tensorrt"]
DType = Literal["float32", "float16", "int8", "uint8", "int32", "int64", "bool"]


def version_tuple(v: str) -> tuple[int, ...]:
    """'1.18.0rc1' -> (1, 18, 0); non-numeric tails are ignored."""
    return tuple(int(m) for m in re.findall(r"\d+", v.split("+")[0].split("rc")[0].split("dev")[0])[:4])


class RuntimeRequirement(WireModel):
    """The runtime an artifact needs; the agent refuses it before downloading if absent."""

    name: RuntimeName
    min_version: Version
    max_version: Version | None = None
    #: ONNX opset the artifact uses (ONNX and TensorRT targets).
    onnx_opset: Annotated[int, Field(ge=1, le=100)] | None = None

    def unmet(self, runtimes: Mapping[str, str]) -> str | None:
        """Why runtimes ``{name: version}`` (a device's, as its hello reports them) cannot load an artifact
        with this requirement, or None when they can. The one rule: the agent's pre-flight and the server's
        choice of artifact both apply it."""
        have = runtimes.get(self.name)
        if have is None:
            present = ", ".join(f"{k} {v}" for k, v in sorted(runtimes.items())) or "none"
            return f"needs {self.name} >= {self.min_version}, which is not installed (installed: {present})"
        if version_tuple(have) < version_tuple(self.min_version):
            return f"needs {self.name} >= {self.min_version}; this device has {have}"
        if self.max_version is not None and version_tuple(have) > version_tuple(self.max_version):
            return f"needs {self.name} <= {self.max_version}; this device has {have}"
        return None


class TensorSpec(WireModel):
    """One model input or output. ``-1`` in ``shape`` marks a dynamic dimension."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    shape: list[Annotated[int, Field(ge=-1, le=1_000_000)]] = Field(max_length=8)
    dtype: DType
    #: Quantisation parameters of int8/uint8 tensors (real = scale * (q - zero_point)).
    scale: Annotated[float, Field(gt=0)] | None = None
    zero_point: Annotated[int, Field(ge=-128, le=255)] | None = None


class SmokeExpectation(WireModel):
    """What this artifact must output on the manifest's golden inputs."""

    outputs: list[list[float]] = Field(max_length=64)
    atol: Annotated[float, Field(ge=0)]
    #: Fraction of golden inputs whose top-1 class must equal ``GoldenSet.labels``.
    min_agreement: Annotated[float, Field(ge=0, le=1)] = 1.0


class ShapeRange(WireModel):
    """One input's TensorRT optimisation profile: the shapes the engine must accept."""

    input: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    min: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=8)
    opt: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=8)
    max: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=8)

    @model_validator(mode="after")
    def _ordered(self) -> ShapeRange:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"profile of {self.input}: min, opt and max need the same rank")
        if any(not a <= b <= c for a, b, c in zip(self.min, self.opt, self.max, strict=True)):
            raise ValueError(f"profile of {self.input}: need min <= opt <= max in every dimension")
        return self


class TensorRTBuild(WireModel):
    """How the device builds a TensorRT engine from this artifact's ONNX file.

    Engines are not portable across GPU architectures or TensorRT versions, so
    the bundle ships the ONNX model and these settings; the agent builds and
    caches the engine. ``validated_on`` lists the (compute capability,
    TensorRT version) pairs these settings were tested on; empty means not
    yet validated on any GPU.
    """

    precision: Precision
    workspace_bytes: Annotated[int, Field(gt=0, le=64 * 1024**3)]
    profiles: list[ShapeRange] = Field(min_length=1, max_length=16)
    #: GPU compute capabilities the settings are intended for, e.g. "8.7" (Jetson Orin).
    compute_capabilities: list[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,2}\.[0-9]{1,2}$")]] = Field(
        min_length=1, max_length=32
    )
    min_tensorrt: Version
    validated_on: list[Annotated[str, StringConstraints(max_length=64)]] = Field(default_factory=list, max_length=64)


class ArtifactEntry(WireModel):
    name: Name
    target: Target
    precision: Precision
    sha256: Sha256Hex
    size: Annotated[int, Field(gt=0, le=MAX_ARTIFACT_BYTES)]
    runtime: RuntimeRequirement
    inputs: list[TensorSpec] = Field(min_length=1, max_length=16)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=16)
    metrics: dict[Name, float] = Field(default_factory=dict, max_length=32)
    smoke: SmokeExpectation | None = None
    tensorrt: TensorRTBuild | None = None

    @model_validator(mode="after")
    def _tensorrt_settings(self) -> ArtifactEntry:
        if (self.target is Target.TENSORRT) != (self.tensorrt is not None):
            raise ValueError(f"artifact {self.name}: TensorRT build settings go with target 'tensorrt' and only there")
        return self


class GoldenSet(WireModel):
    """Inputs the device runs after installing, before switching to the new slot."""

    #: Each input flattened in row-major order to the first input's shape (batch 1).
    #: At most GOLDEN_VALUES_3 values each; more than GOLDEN_VALUES_2 only in a /3 manifest (schema_for).
    inputs: list[Annotated[list[float], Field(max_length=GOLDEN_VALUES_3)]] = Field(min_length=1, max_length=64)
    #: Expected top-1 class per input, for classification models.
    labels: list[Annotated[int, Field(ge=0)]] | None = None

    @model_validator(mode="after")
    def _labels_match(self) -> GoldenSet:
        if self.labels is not None and len(self.labels) != len(self.inputs):
            raise ValueError(f"{len(self.labels)} labels for {len(self.inputs)} golden inputs")
        return self


def _check_bins(edges: list[float], counts: list[int], what: str) -> None:
    if len(counts) != len(edges) - 1:
        raise ValueError(f"{what}: {len(edges)} edges need {len(edges) - 1} counts, got {len(counts)}")
    if any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"{what}: bin edges must be strictly increasing")


class FeatureReference(WireModel):
    """Reference distribution of one input feature over the training data.

    ``edges`` are K+1 increasing bin edges (training quantiles, or one bin per
    value of a discrete feature); ``counts`` the K training counts. Values
    outside ``[edges[0], edges[-1]]`` count as out of range on the device.
    ``kind``, ``nan`` and ``outside`` are read by the server only (the device
    counts the same way whatever they say); left out, they mean continuous, 0
    and 0, so a profile that needs none of them keeps its earlier bytes.
    """

    name: Name
    version: Annotated[int, Field(ge=1)] | None = None
    edges: list[float] = Field(min_length=3, max_length=MAX_BINS + 1)
    counts: list[Annotated[int, Field(ge=0)]] = Field(min_length=2, max_length=MAX_BINS)
    mean: float
    std: Annotated[float, Field(ge=0)]
    #: ``discrete``: integral or few distinct values, one bin per value where they fit; None: continuous.
    kind: Literal["continuous", "discrete"] | None = None
    #: Training rows whose value was NaN or ±inf (None: 0).
    nan: Annotated[int, Field(ge=0)] | None = None
    #: Training rows whose value lay outside the edges (None: 0); for registry features they are also in the
    #: end bins' counts.
    outside: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _bins(self) -> FeatureReference:
        _check_bins(self.edges, self.counts, f"feature {self.name}")
        return self


class Preprocessing(WireModel):
    """What the model does to its input before the first layer.

    With ``in_graph`` the steps are part of the exported graph: devices feed
    raw inputs and cannot disagree with training about them.
    """

    kind: Literal["none", "normalize"]
    mean: list[float] = Field(default_factory=list, max_length=4096)
    std: list[Annotated[float, Field(gt=0)]] = Field(default_factory=list, max_length=4096)
    in_graph: bool = True
    description: ShortText = ""


class ReferenceProfile(WireModel):
    """What the training data looked like; the device counts its inputs on these bins."""

    #: ``raw``: features are the input tensor's values, in order; ``image``: the
    #: summary features of ``summaries`` (see ``agent.summaries``); ``features``:
    #: the values of the manifest's registry features (``protocol.features``).
    kind: Literal["raw", "image", "features"]
    summaries: Literal["image-summaries/1"] | None = None
    n: Annotated[int, Field(gt=0)]
    features: list[FeatureReference] = Field(min_length=1, max_length=MAX_FEATURES)
    #: Classification: the training set's count per class. Regression (with ``output_edges``): the fp32 model's
    #: training predictions counted on the output bins, values beyond the edges in the end bins.
    class_counts: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=1000)
    confidence_edges: list[float] | None = Field(default=None, max_length=MAX_BINS + 1)
    confidence_counts: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=MAX_BINS)
    #: A regression model's output bins: K+1 increasing edges (quantiles of the fp32 model's predictions on the
    #: training split) on which ``class_counts`` and a device's windows count the first output's values.
    output_edges: list[float] | None = Field(default=None, min_length=3, max_length=MAX_BINS + 1)

    @model_validator(mode="after")
    def _consistent(self) -> ReferenceProfile:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if (self.kind == "image") != (self.summaries is not None):
            raise ValueError("an image profile names its summary function in 'summaries', a raw one does not")
        if (self.confidence_edges is None) != (self.confidence_counts is None):
            raise ValueError("confidence_edges and confidence_counts go together")
        if self.confidence_edges is not None and self.confidence_counts is not None:
            _check_bins(self.confidence_edges, self.confidence_counts, "confidence histogram")
        if self.output_edges is not None:
            if self.class_counts is None:
                raise ValueError("output_edges go with class_counts: the training predictions on those bins")
            if self.confidence_edges is not None:
                raise ValueError("a profile with output_edges (a regression model) has no confidence histogram")
            _check_bins(self.output_edges, self.class_counts, "output bins")
        return self


class Manifest(WireModel):
    """A signed bundle's contents. Serialised canonically, it is what gets signed."""

    KIND: ClassVar[str] = "manifest"
    MAX_BYTES: ClassVar[int] = 1024 * 1024

    schema_: ManifestSchema = Field(default=MANIFEST_SCHEMA, alias="schema")
    model: Name
    version: Version
    created_at: AwareDatetime
    author: ShortText | None = None
    description: Text = ""
    task: Literal["classification", "regression"]
    #: Class names, index = class id.
    labels: list[ShortText] | None = Field(default=None, max_length=1000)
    artifacts: list[ArtifactEntry] = Field(min_length=1, max_length=16)
    preprocessing: Preprocessing | None = None
    golden: GoldenSet | None = None
    reference: ReferenceProfile | None = None
    #: Registry features the model computes in its graph from raw input columns (``reference.kind`` is then
    #: ``features``: the device counts each feature's value, keyed by name and version).
    features: FeatureSet | None = None
    #: Where this version came from: dataset hash, code revision, seed, parent version.
    lineage: dict[Name, ShortText] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _unique_artifacts(self) -> Manifest:
        wanted = schema_for(self.reference, self.golden)
        if self.schema_ != wanted:
            if wanted == MANIFEST_SCHEMA_3 and self.reference is not None and self.reference.output_edges is not None:
                raise ValueError(f"schema: a manifest whose reference profile has output_edges has schema {wanted}")
            if wanted == MANIFEST_SCHEMA_3:
                raise ValueError(f"schema: a manifest with golden inputs of more than {GOLDEN_VALUES_2} values has "
                                 f"schema {wanted}")
            if self.schema_ == MANIFEST_SCHEMA_3:
                raise ValueError(f"schema: a manifest whose reference profile has no output_edges and whose golden "
                                 f"inputs hold at most {GOLDEN_VALUES_2} values each has schema {wanted}")
            uses = "uses" if wanted == MANIFEST_SCHEMA_2 else "does not use"
            raise ValueError(f"schema: a manifest whose reference profile {uses} the feature fields kind, nan or "
                             f"outside has schema {wanted}")
        names = [a.name for a in self.artifacts]
        if len(set(names)) != len(names):
            raise ValueError("artifact names must be unique within a manifest")
        if self.reference is not None and self.reference.output_edges is not None and self.task != "regression":
            raise ValueError("reference.output_edges are a regression model's output bins; this manifest's task is "
                             f"{self.task}")
        if (self.features is not None) != (self.reference is not None and self.reference.kind == "features"):
            raise ValueError("a manifest with registry features has a 'features' reference profile, and only then")
        if self.features is not None and self.reference is not None:
            want = [(d.name, d.version) for d in self.features.definitions]
            have = [(f.name, f.version) for f in self.reference.features]
            if want != have:
                raise ValueError("the reference profile must list the registry features, in order, with versions")
        return self

    def artifact(self, name: str) -> ArtifactEntry:
        """The artifact called ``name``; KeyError if there is none."""
        for art in self.artifacts:
            if art.name == name:
                return art
        raise KeyError(name)


def schema_for(reference: ReferenceProfile | None, golden: GoldenSet | None = None) -> ManifestSchema:
    """The manifest schema a bundle with this reference profile and golden set must declare: /3 when the profile
    has ``output_edges`` (a regression model's output bins) or a golden input holds more than
    :data:`GOLDEN_VALUES_2` values, else /2 when any feature reference uses ``kind``, ``nan`` or ``outside``
    (docs/protocol.md §10: a new field or a wider limit is a new version), else /1."""
    if reference is not None and reference.output_edges is not None:
        return MANIFEST_SCHEMA_3
    if golden is not None and any(len(row) > GOLDEN_VALUES_2 for row in golden.inputs):
        return MANIFEST_SCHEMA_3
    if reference is not None and any(f.kind is not None or f.nan is not None or f.outside is not None
                                     for f in reference.features):
        return MANIFEST_SCHEMA_2
    return MANIFEST_SCHEMA


def manifest_digest(manifest: Manifest) -> str:
    """Content address of a manifest: sha256 of its canonical JSON."""
    return sha256_hex(wire_bytes(manifest))
