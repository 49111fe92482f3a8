"""``build()``: dataset → validated → trained → exported → quantised → evaluated → signed bundle.

Steps report to a :class:`Reporter` (the CLI draws rich progress bars). A
build that fails at any step raises a :class:`~toolchain.errors.ToolchainError`
and leaves no bundle behind; training checkpoints stay in the work directory
so ``resume=True`` continues an interrupted run.
"""

from __future__ import annotations

import os

# LiteRT's converter and its C++ dependencies log to stderr unless told otherwise
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from agent.backends import IOSpec, open_backend
from protocol import (
    ArtifactEntry,
    GoldenSet,
    Manifest,
    Precision,
    Preprocessing,
    RuntimeRequirement,
    ShapeRange,
    SmokeExpectation,
    Target,
    TensorRTBuild,
    TensorSpec,
)
from protocol.features import FeatureSet
from protocol.manifest import schema_for
from protocol.version import __version__
from toolchain import data as datamod
from toolchain.bundle import (
    ARTIFACTS,
    CARD,
    REPORT,
    bundle_staging,
    load_signing_key,
    pack_tar,
    report_json,
    sha256_file,
    write_signed_manifest,
)
from toolchain.card import render_card
from toolchain.errors import ConversionError, DataError, ModelError, QualityGateFailed, ToolchainError
from toolchain.evaluate import Evaluation, evaluate, gate
from toolchain.profile import golden_indices, reference_profile, softmax
from toolchain.quality import (
    confusion_matrix,
    per_class_metrics,
    permutation_importance,
    slice_gate,
    slice_metrics,
)
from toolchain.validate import ValidationReport, check_leakage, validate

__all__ = ["BuildResult", "BuildSpec", "NullReporter", "Reporter", "build"]

Recipe = Literal["digits", "tabular", "torch", "onnx"]
#: ONNX opset -> first ONNX Runtime release that runs it.
_ORT_FOR_OPSET = {17: "1.13.0", 18: "1.14.0", 19: "1.16.0", 20: "1.17.0", 21: "1.20.0", 22: "1.20.0", 23: "1.22.0"}
#: GPUs the TensorRT settings are meant for: Jetson Xavier 7.2, Orin 8.7; x86 T4/A100/A10/L4/H100.
_TRT_CAPABILITIES = ["7.2", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0"]


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

    @property
    def workdir(self) -> Path:
        return self.work_dir or self.out.parent / f".{self.out.name}.work"


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    report: dict[str, Any]
    tar: Path | None = None
    rejected: dict[str, str] = field(default_factory=dict)


class ValidationFailed(DataError):
    def __init__(self, report: ValidationReport) -> None:
        super().__init__(f"data validation failed: {report.summary()}")
        self.report = report


def _load(spec: BuildSpec, progress: Any = None) -> datamod.Dataset:
    """The dataset of ``spec``; ``progress`` (a reporter step) is advanced by the rows read where that is slow."""
    if spec.sql is not None or spec.query is not None:
        if spec.recipe == "digits":
            raise DataError("the digits recipe has its own data; --sql/--query feed the tabular, torch and onnx "
                            "recipes")
        if spec.data is not None:
            raise DataError("give the dataset either as --data FILE or as --sql URL --query SELECT, not both")
        if spec.sql is None or spec.query is None:
            raise DataError("--sql URL and --query \"SELECT ...\" go together: the database and what to read")
        if spec.schema is None:
            raise DataError("a SQL query needs a schema: --schema FILE.toml (label, features, ranges)")
        return datamod.load_sql(spec.sql, spec.query, datamod.load_schema(spec.schema),
                                on_rows=progress.advance if progress is not None else None)
    if spec.recipe == "digits":
        return datamod.load_digits()
    if spec.data is None:
        raise DataError(f"the {spec.recipe} recipe needs a dataset: --data FILE (.csv, .parquet or .npz) or "
                        "--sql URL --query SELECT")
    if spec.data.suffix.lower() == ".npz":
        return datamod.load_npz(spec.data)
    if spec.schema is None:
        raise DataError(f"{spec.data} needs a schema: --schema FILE.toml (label, features, ranges)")
    return datamod.load_table(spec.data, datamod.load_schema(spec.schema))


def _tensor(spec: IOSpec, name: str) -> TensorSpec:
    dtype = spec.dtype if spec.dtype in ("float32", "float16", "int8", "uint8", "int32", "int64") else "float32"
    return TensorSpec(name=name or spec.name, shape=list(spec.shape), dtype=dtype,  # type: ignore[arg-type]
                      scale=spec.scale if spec.quantized else None,
                      zero_point=spec.zero_point if spec.quantized else None)


@dataclass
class _Candidate:
    name: str
    target: Target
    precision: Precision
    path: Path
    runtime: str
    evaluation: Evaluation | None = None
    tensorrt: TensorRTBuild | None = None


def _code_revision() -> str | None:
    """The git commit of this edgeherd checkout, when it is one (``+dirty`` with local changes)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],  # noqa: S603, S607
                             capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],  # noqa: S603, S607
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "") if rev else None


def _evaluated(c: _Candidate) -> Evaluation:
    if c.evaluation is None:
        raise RuntimeError(f"{c.name} was not evaluated")
    return c.evaluation


def _torch_model(spec: BuildSpec, ds: datamod.Dataset, train_x: np.ndarray, fs: FeatureSet | None = None
                 ) -> tuple[Any, Preprocessing, bool]:
    """(model, preprocessing, needs_training)."""
    import torch

    from toolchain.models import DigitsCNN, Normalized, TabularMLP, load_user_model

    torch.manual_seed(spec.seed)  # initial weights are part of the seeded run

    if spec.recipe == "torch":
        if spec.model is None or spec.weights is None:
            raise ModelError("the torch recipe needs --model module:Class and --weights FILE")
        return load_user_model(spec.model, spec.weights), Preprocessing(
            kind="none", description="as defined by the supplied model"), False
    if spec.recipe == "digits" or ds.kind == "image":
        mean_px, std_px = float(train_x.mean()), float(train_x.std()) or 1.0
        core = DigitsCNN(len(ds.classes)) if ds.input_shape == (1, 8, 8) else None
        if core is None:
            raise ModelError(f"no built-in model for images shaped {ds.input_shape}; bring one with --model")
        pre = Preprocessing(kind="normalize", mean=[mean_px], std=[std_px], in_graph=True,
                            description="one mean and std over all pixels of the training split")
        return Normalized(core, np.float32(mean_px), np.float32(std_px)), pre, True
    flat = train_x.reshape(len(train_x), -1)
    if fs is not None:  # registry features, computed in the graph ahead of the normalisation
        from agent.features import model_columns
        from toolchain.features import transform_module

        flat = model_columns(fs, flat)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    pre = Preprocessing(kind="normalize", mean=[float(v) for v in mean], std=[float(v) for v in std], in_graph=True,
                        description="per-feature mean and std of the training split" + (
                            f", after the registry features {', '.join(d.ref for d in fs.definitions)}"[:200]
                            if fs is not None else ""))
    net = Normalized(TabularMLP(flat.shape[1], len(ds.classes)), mean, std)
    if fs is not None:
        return torch.nn.Sequential(transform_module(fs), net), pre, True
    return net, pre, True


#: Permutation importance runs on at most this many validation rows (a seeded sample beyond it).
_IMPORTANCE_MAX_ROWS = 10_000


def _quality(spec: BuildSpec, ds: datamod.Dataset, artifact: str, fp32: Path, base: Evaluation,
             xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], segs: dict[str, dict[str, np.ndarray]],
             ) -> dict[str, Any]:
    """Report sections "per_class", "confusion", "slices", "importance" for the fp32 ONNX model.

    Raises :class:`QualityGateFailed` when ``spec.min_slice_metric`` is set and the worst slice is below it.
    """
    out: dict[str, Any] = {}
    pred = base.outputs.argmax(1)
    cm = confusion_matrix(ys["test"], pred, len(ds.classes))
    out["per_class"] = {"split": "test", "artifact": artifact,
                        "classes": [m.to_dict() for m in per_class_metrics(cm, ds.classes)]}
    out["confusion"] = {"split": "test", "artifact": artifact, "rows": "true", "columns": "predicted",
                        "labels": list(ds.classes), "matrix": cm.tolist()}
    if segs["test"]:
        slices = slice_metrics(ys["test"], pred, segs["test"])
        out["slices"] = {"split": "test", "artifact": artifact, **slices.to_dict(),
                         "min_slice_metric": spec.min_slice_metric}
        if spec.min_slice_metric is not None:
            why = slice_gate(slices, spec.min_slice_metric)
            if why:
                raise QualityGateFailed(f"quality gate failed: {why}; nothing was written")
    else:
        out["slices"] = {"skipped": "the dataset declares no segment columns (schema `segments`)"}

    xv, yv = xs["validation"], ys["validation"]
    names = [f.name for f in ds.schema.features]
    if ds.kind != "tabular" or xv.ndim != 2 or xv.shape[1] != len(names):
        out["importance"] = {"skipped": f"{ds.kind} inputs shaped {list(ds.input_shape)}: single input values "
                             "mean little alone; permutation importance is computed for table columns only"}
        return out
    if len(xv) > _IMPORTANCE_MAX_ROWS:
        rows = np.sort(np.random.default_rng(spec.seed).choice(len(xv), _IMPORTANCE_MAX_ROWS, replace=False))
        xv, yv = xv[rows], yv[rows]
    backend = open_backend(fp32, "onnxruntime")
    try:
        imp = permutation_importance(xv, yv, lambda a: backend.predict(a).argmax(1), names,
                                     repeats=spec.importance_repeats, seed=spec.seed)
    finally:
        backend.close()
    out["importance"] = {"split": "validation", "artifact": artifact, **imp.to_dict()}
    return out


def _input_name(path: Path) -> str:
    backend = open_backend(path, "onnxruntime")
    try:
        return backend.input.name
    finally:
        backend.close()


def _user_onnx(spec: BuildSpec, ds: datamod.Dataset, fp32: Path, sample: np.ndarray, build_report: dict[str, Any],
               rep: Reporter) -> list[str]:
    """Write the user's ONNX model to ``fp32`` with its scores output alone (toolchain/onnx_input.py) and check
    it runs on the dataset; records "onnx_input" in the report and returns the operator domains it uses beyond
    the default ONNX one."""
    from toolchain.onnx_input import prepare_onnx

    src = spec.onnx
    if src is None:
        raise ModelError("the onnx recipe needs --onnx FILE")
    prepared = prepare_onnx(src, fp32, spec.output)
    build_report["onnx_input"] = {"source_output": prepared.source_output, "output": prepared.output,
                                  "zipmap_removed": prepared.zipmap, "dropped_outputs": prepared.dropped,
                                  "operator_domains": prepared.domains, "notes": prepared.notes()}
    for note in prepared.notes():
        rep.info(f"{src.name}: {note}")
    labels = prepared.class_labels
    if labels is not None and labels != list(ds.classes):
        order = ("in another order: declare classes = [" + ", ".join(f'"{c}"' for c in labels)
                 + "] in the schema so that both agree" if sorted(labels) == sorted(ds.classes) else
                 "and they differ: train and build on the same label set")
        raise ModelError(f"{src}: the model's score columns are the classes {labels}, the dataset's classes are "
                         f"{list(ds.classes)}, {order}")
    try:
        probe = open_backend(fp32, "onnxruntime")
        try:
            out = probe.predict(sample[:1])
        finally:
            probe.close()
    except Exception as exc:
        raise ModelError(f"{src} cannot run on this dataset: {exc}") from None
    if out.ndim != 2 or out.shape[1] != len(ds.classes):
        raise ModelError(f"{src}: output {prepared.output!r} gives {out.shape[1:]} values per row, the dataset has "
                         f"{len(ds.classes)} classes; the build needs one score per class")
    return prepared.domains


def _quality_note(quality: dict[str, Any]) -> str:
    parts = []
    worst = quality["slices"].get("worst")
    if worst:
        parts.append(f"worst slice {worst['column']}={worst['value']} {worst['accuracy']:.4f}")
    features = quality["importance"].get("features")
    if features:
        parts.append(f"top feature {features[0]['name']}")
    return ", ".join(parts) or "per-class metrics"


def _feature_set(spec: BuildSpec, ds: datamod.Dataset, report: ValidationReport, kept: np.ndarray
                 ) -> FeatureSet | None:
    """The registry features the schema names, resolved from ``spec.features`` and checked on the data (each
    definition's range and missing rate: fatal or a warning, as the definition says)."""
    refs = ds.schema.registry_features
    if not refs:
        if spec.features is not None:
            raise DataError("--features was given but the schema names no registry_features")
        return None
    if spec.features is None:
        raise DataError("the schema names registry_features; give their definitions with --features FILE.toml")
    if ds.kind != "tabular" or spec.recipe not in ("tabular",):
        raise DataError("registry features are for the tabular recipe")
    from toolchain.features import check_features, load_definitions, resolve

    definitions = resolve(load_definitions(spec.features), refs)
    try:
        fs = FeatureSet(inputs=[f.name for f in ds.schema.features], definitions=definitions)
    except ValueError as exc:
        raise DataError(f"registry features: {exc}") from None
    for check in check_features(fs, ds.table()):  # every row: missing values are what max_missing is about
        d = check.definition
        for problem in check.problems:
            report.add(f"feature {d.ref}", "fatal" if d.on_violation == "fatal" else "warning", problem)
        if not check.problems:
            report.add(f"feature {d.ref}", "ok", f"{check.missing_rate:.2%} missing, "
                       f"{check.out_of_range_rate:.2%} out of range")
    return fs


def build(spec: BuildSpec, reporter: Reporter | None = None) -> BuildResult:
    rep = reporter or NullReporter()
    key = load_signing_key(spec.key)  # fail before any work, not after training
    if spec.recipe in ("digits", "tabular"):
        from toolchain.train import resolve_device

        resolve_device(spec.device)  # a GPU asked for and missing: say so now
    if spec.out.exists() and (not spec.out.is_dir() or any(spec.out.iterdir())):
        with bundle_staging(spec.out):  # raises BundleError naming what is there
            pass
    if spec.recipe == "onnx" and (spec.onnx is None or not spec.onnx.is_file()):
        raise ModelError(f"ONNX file {spec.onnx} does not exist" if spec.onnx else "the onnx recipe needs --onnx FILE")
    if spec.output is not None and spec.recipe != "onnx":
        raise ModelError(f"--output {spec.output!r} chooses an output of an --onnx model; the {spec.recipe} recipe "
                         "exports its own model with one output")
    if spec.recipe == "onnx":
        from toolchain.onnx_input import load_onnx

        load_onnx(spec.onnx)  # type: ignore[arg-type]  # checked above; not a model: say so before reading data
    if spec.min_slice_metric is not None and not 0.0 <= spec.min_slice_metric <= 1.0:
        raise ToolchainError(f"min_slice_metric is an accuracy between 0 and 1, got {spec.min_slice_metric}")
    if spec.importance_repeats < 1:
        raise ToolchainError(f"importance_repeats must be at least 1, got {spec.importance_repeats}")

    with rep.step("load and validate data") as st:
        ds = _load(spec, st)
        report, kept = validate(ds)
        splits_local = datamod.split_indices(ds.y[kept], spec.seed)
        splits = {k: kept[v] for k, v in splits_local.items()}
        check_leakage(report, ds, splits["train"], splits["test"])
        sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        st.note(f"{report.rows_kept}/{report.rows_in} rows kept, {sizes}")
    fs = _feature_set(spec, ds, report, kept)
    if not report.ok:
        raise ValidationFailed(report)
    if spec.min_slice_metric is not None and not ds.segments:
        raise DataError(f"--min-slice-metric {spec.min_slice_metric} needs segment columns, and the dataset "
                        f"{ds.source} has none: declare `segments` in the table's schema TOML, e.g. "
                        "segments = [\"site\"] (columns that are not model inputs)")
    xs = {k: ds.x[v] for k, v in splits.items()}
    ys = {k: ds.y[v] for k, v in splits.items()}
    segs = {k: {c: a[v] for c, a in ds.segments.items()} for k, v in splits.items()}  # aligned with xs, ys
    name = spec.name or ds.name
    build_report: dict[str, Any] = {"validation": report.to_dict(), "splits": {k: len(v) for k, v in splits.items()}}

    model = None
    preprocessing = Preprocessing(kind="none", description="as defined by the supplied ONNX model")
    if spec.recipe != "onnx":
        model, preprocessing, needs_training = _torch_model(spec, ds, xs["train"], fs)
        if needs_training:
            from toolchain.train import TrainConfig, device_name, resolve_device, train

            cfg = TrainConfig(epochs=spec.epochs or (30 if spec.recipe == "digits" else 60), seed=spec.seed)
            with rep.step("train", total=cfg.epochs) as st:
                result = train(model, (xs["train"], ys["train"]), (xs["validation"], ys["validation"]), cfg,
                               spec.workdir / "checkpoints", data_digest=ds.sha256, resume=spec.resume,
                               on_epoch=lambda r: st.advance(), device=spec.device)
                if result.resumed_from:
                    rep.info(f"resumed from the checkpoint of epoch {result.resumed_from}")
                last = result.history[-1]
                st.note(f"{cfg.epochs} epochs, validation accuracy {last.val_accuracy:.4f}")
            build_report["training"] = {"epochs": cfg.epochs, "seed": cfg.seed, "resumed_from": result.resumed_from,
                                        "device": device_name(resolve_device(spec.device)),
                                        "history": [vars(h) for h in result.history]}

    with bundle_staging(spec.out) as staging:
        work = staging / ".work"
        work.mkdir()
        candidates: list[_Candidate] = []
        #: Targets not built, and why (the report's "skipped", the model card's "Not built").
        skipped: dict[str, str] = {}
        domains: list[str] = []
        with rep.step("export ONNX") as st:
            fp32 = work / "model.onnx"
            if model is not None:
                from toolchain.export import export_onnx, torch_logits

                export_onnx(model, xs["test"], fp32)
                probe = open_backend(fp32, "onnxruntime")
                try:
                    onnx_out = probe.predict(xs["test"])
                finally:
                    probe.close()
                parity = float(np.abs(onnx_out - torch_logits(model, xs["test"])).max())
                build_report["onnx_parity_max_abs_diff"] = parity
                st.note(f"max abs diff vs torch {parity:.2e}")
            else:
                domains = _user_onnx(spec, ds, fp32, xs["test"], build_report, rep)
                st.note(f"output {build_report['onnx_input']['output']!r}")
            input_name = _input_name(fp32)
            candidates.append(_Candidate(f"{name}-onnx-fp32", Target.ONNX, Precision.FP32, fp32, "onnxruntime"))
        with rep.step("quantize ONNX int8 (QDQ, per-channel)") as st:
            from toolchain.quantize import int8_unsupported, quantize_onnx

            int8, sym_path = work / "model.int8.onnx", work / "model.int8-sym.onnx"
            sym: Path | None = sym_path
            why_not = int8_unsupported(domains)
            if why_not is None:
                try:
                    quantize_onnx(fp32, int8, xs["calibration"])
                    quantize_onnx(fp32, sym_path, xs["calibration"], symmetric=True)
                except ConversionError as exc:
                    if model is not None:  # a model this build exported itself: a bug to report, not to skip
                        raise
                    why_not = f"{exc}; the fp32 model ships"
            if why_not is None:
                candidates.append(_Candidate(f"{name}-onnx-int8", Target.ONNX, Precision.INT8, int8, "onnxruntime"))
            else:
                skipped["onnx-int8"] = why_not
                sym = None
                st.note("skipped")
        if spec.tflite and model is not None:
            with rep.step("convert TFLite fp32 and int8 (litert-torch)") as st:
                from toolchain.export import export_tflite

                tfl = work / "model.tflite"
                export_tflite(model, xs["test"], tfl)
                tfl8 = work / "model.int8.tflite"
                export_tflite(model, xs["test"], tfl8, int8_calibration=xs["calibration"])
                candidates += [
                    _Candidate(f"{name}-tflite-fp32", Target.TFLITE, Precision.FP32, tfl, "ai-edge-litert"),
                    _Candidate(f"{name}-tflite-int8", Target.TFLITE, Precision.INT8, tfl8, "ai-edge-litert"),
                ]
        elif model is None:
            skipped["tflite"] = "needs a torch model; an ONNX input cannot be converted here"
        shape = list(ds.input_shape)
        trt_inputs: list[tuple[Precision, Path]] = [(Precision.FP16, fp32)]
        if domains:
            skipped["tensorrt"] = (f"TensorRT's ONNX parser reads operators of the default ONNX domain only; this "
                                   f"model uses operators of {', '.join(domains)}")
            trt_inputs = []
        elif sym is None:
            skipped["tensorrt-int8"] = "needs the symmetric int8 ONNX model, which was not made (see onnx-int8)"
        else:
            trt_inputs.append((Precision.INT8, sym))
        if skipped:
            build_report["skipped"] = skipped
        for prec, path in trt_inputs:
            candidates.append(_Candidate(
                f"{name}-tensorrt-{prec.value}", Target.TENSORRT, prec, path, "onnxruntime",
                tensorrt=TensorRTBuild(
                    precision=prec, workspace_bytes=256 * 1024**2,
                    profiles=[ShapeRange(input=input_name, min=[1, *shape], opt=[1, *shape], max=[32, *shape])],
                    compute_capabilities=_TRT_CAPABILITIES, min_tensorrt="10.0", validated_on=[],
                ),
            ))

        with rep.step("evaluate on the test split", total=len(candidates)) as st:
            for c in candidates:
                c.evaluation = evaluate(c.path, c.runtime, xs["test"], ys["test"])
                st.advance()
        evals = {c.name: _evaluated(c) for c in candidates}
        base = evals[candidates[0].name]
        rejected: dict[str, str] = {}
        for c in candidates[1:]:
            why = gate(evals[c.name].accuracy, base.accuracy, spec.max_drop)
            if why:
                rejected[c.name] = why
        build_report["rejected"] = rejected
        kept_c = [c for c in candidates if c.name not in rejected]

        with rep.step("quality: per-class metrics, slices, feature importance") as st:
            quality = _quality(spec, ds, candidates[0].name, fp32, base, xs, ys, segs)
            build_report.update(quality)
            st.note(_quality_note(quality))

        with rep.step("reference profile and golden vectors") as st:
            probs = softmax(open_backend(fp32, "onnxruntime").predict(xs["train"]))
            feature_names = [f.name for f in ds.schema.features] if ds.kind == "tabular" else None
            if fs is not None:
                from toolchain.features import reference_for

                reference = reference_for(fs, xs["train"], ys["train"], len(ds.classes), probs)
            else:
                reference = reference_profile(xs["train"], ds.kind, feature_names, ys["train"], len(ds.classes),
                                              probs)
            gi = golden_indices(ys["test"])
            golden_labels = [int(v) for v in base.outputs[gi].argmax(1)]
            golden = GoldenSet(inputs=[[float(v) for v in xs["test"][i].ravel()] for i in gi], labels=golden_labels)
            st.note(f"{len(reference.features)} features, {len(gi)} golden inputs")

        entries = []
        files: dict[str, Path] = {}
        for c in kept_c:
            ev = evals[c.name]
            outputs = ev.outputs[gi]
            agreement = float((outputs.argmax(1) == np.array(golden_labels)).mean())
            span = float(np.abs(outputs).max()) or 1.0
            atol = 1e-3 * span if c.precision is Precision.FP32 and c.target is not Target.TENSORRT else 0.05 * span
            sha = sha256_file(c.path)
            files[sha] = c.path
            if c.runtime == "onnxruntime":
                from toolchain.export import onnx_opset

                opset = onnx_opset(c.path)
                runtime = RuntimeRequirement(
                    name="tensorrt" if c.target is Target.TENSORRT else "onnxruntime",
                    min_version="10.0" if c.target is Target.TENSORRT else _ORT_FOR_OPSET.get(opset, "1.17.0"),
                    onnx_opset=opset)
            else:
                runtime = RuntimeRequirement(name="ai-edge-litert", min_version=dist_version("ai-edge-litert"))
            metrics = ev.metrics() | {"accuracy_drop_points": round((base.accuracy - ev.accuracy) * 100, 4)}
            if c.target is Target.TENSORRT:
                metrics["measured_with_onnxruntime"] = 1.0
            entries.append(ArtifactEntry(
                name=c.name, target=c.target, precision=c.precision, sha256=sha, size=c.path.stat().st_size,
                runtime=runtime, inputs=[_tensor(ev.input, "input" if c.runtime != "onnxruntime" else "")],
                outputs=[_tensor(ev.output, "logits" if c.runtime != "onnxruntime" else "")],
                metrics=metrics, tensorrt=c.tensorrt,
                smoke=SmokeExpectation(outputs=[[float(v) for v in row] for row in outputs], atol=atol,
                                       min_agreement=agreement),
            ))

        split_digest = hashlib.sha256(b"".join(splits[k].astype("<i8").tobytes() for k in datamod.SPLITS))
        lineage = {
            "recipe": spec.recipe, "dataset_sha256": ds.sha256, "dataset_source": ds.source[-256:],
            "seed": str(spec.seed), "edgeherd": __version__, "max_drop_points": str(spec.max_drop),
            "split_sizes": "/".join(str(len(splits[k])) for k in datamod.SPLITS),
            "split_sha256": split_digest.hexdigest(), "onnxruntime": dist_version("onnxruntime"),
        }
        if "training" in build_report:
            lineage["epochs"] = str(build_report["training"]["epochs"])
            lineage["train_device"] = build_report["training"]["device"][:256]
        worst = build_report["slices"].get("worst")
        if worst:
            lineage["worst_slice"] = (f"{worst['column']}={worst['value']} accuracy {worst['accuracy']:.4f} "
                                      f"n {worst['n']}")[:256]
        if build_report["importance"].get("features"):
            top = build_report["importance"]["features"][0]
            lineage["top_feature"] = f"{top['name']} accuracy drop {top['mean']:.4f}"
        revision = _code_revision()
        if revision:
            lineage["code_revision"] = revision
        if model is not None:
            lineage["torch"] = dist_version("torch")
        if spec.parent:
            lineage["parent_version"] = spec.parent
        if spec.model:
            lineage["model_class"] = spec.model
        if "onnx_input" in build_report:
            lineage["onnx_output"] = build_report["onnx_input"]["output"]
        if fs is not None:
            from toolchain.features import feature_lineage

            lineage.update(feature_lineage(fs))
        manifest = Manifest(
            schema_=schema_for(reference), model=name, version=spec.version, created_at=datetime.now(timezone.utc),
            author=spec.author,
            description=spec.description or f"{spec.recipe} model trained on {ds.name}",
            task="classification", labels=ds.classes, artifacts=entries, preprocessing=preprocessing,
            golden=golden, reference=reference, lineage=lineage, features=fs,
        )
        with rep.step("sign and write the bundle") as st:
            for sha, path in files.items():  # content-addressed: two artifacts may share one file
                os.replace(path, staging / ARTIFACTS / sha)
            shutil.rmtree(work)
            write_signed_manifest(staging, manifest, key)
            (staging / CARD).write_text(render_card(manifest, build_report), encoding="utf-8")
            (staging / REPORT).write_text(report_json(build_report), encoding="utf-8")
    tar = None
    if spec.tar:
        tar = spec.out.with_name(spec.out.name + ".tar")
        pack_tar(spec.out, tar)
    shutil.rmtree(spec.workdir, ignore_errors=True)
    return BuildResult(out=spec.out, manifest=manifest, report=build_report, tar=tar, rejected=rejected)
