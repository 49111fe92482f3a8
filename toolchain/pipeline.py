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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

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
from toolchain.evaluate import Evaluation, error_gate, evaluate, gate
from toolchain.profile import golden_indices, reference_profile, softmax
from toolchain.quality import (
    confusion_matrix,
    per_class_metrics,
    permutation_importance,
    slice_gate,
    slice_metrics,
)
from toolchain.sources import ValidationFailed, feature_set, input_name, load_dataset, torch_model, user_onnx
from toolchain.spec import BuildSpec, NullReporter, Recipe, Reporter
from toolchain.validate import check_leakage, validate

__all__ = ["BuildResult", "BuildSpec", "NullReporter", "Recipe", "Reporter", "ValidationFailed", "build"]

#: ONNX opset -> first ONNX Runtime release that runs it.
_ORT_FOR_OPSET = {17: "1.13.0", 18: "1.14.0", 19: "1.16.0", 20: "1.17.0", 21: "1.20.0", 22: "1.20.0", 23: "1.22.0"}
#: GPUs the TensorRT settings are meant for: Jetson Xavier 7.2, Orin 8.7; x86 T4/A100/A10/L4/H100.
_TRT_CAPABILITIES = ["7.2", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0"]


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    report: dict[str, Any]
    tar: Path | None = None
    rejected: dict[str, str] = field(default_factory=dict)


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


def _regression_quality(spec: BuildSpec, ds: datamod.Dataset, artifact: str, fp32: Path, base: Evaluation,
                        xs: dict[str, np.ndarray], ys: dict[str, np.ndarray],
                        segs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Report sections "slices" (MAE per segment value) and "importance" (MAE rise) for a regression model."""
    from toolchain.regression import quality

    xv, yv = xs["validation"], ys["validation"]
    names = [f.name for f in ds.schema.features]
    why = None
    if ds.kind != "tabular" or xv.ndim != 2 or xv.shape[1] != len(names):
        why = f"{ds.kind} inputs shaped {list(ds.input_shape)}: permutation importance is for table columns only"
    if len(xv) > _IMPORTANCE_MAX_ROWS:
        rows = np.sort(np.random.default_rng(spec.seed).choice(len(xv), _IMPORTANCE_MAX_ROWS, replace=False))
        xv, yv = xv[rows], yv[rows]
    backend = open_backend(fp32, "onnxruntime")
    try:
        return quality(ys["test"], base.outputs.reshape(len(base.outputs), -1)[:, 0], segs["test"], artifact, xv, yv,
                       lambda a: backend.predict(a).reshape(len(a), -1)[:, 0], names,
                       repeats=spec.importance_repeats, seed=spec.seed, why_no_importance=why)
    finally:
        backend.close()


def _quality_note(quality: dict[str, Any]) -> str:
    parts = []
    worst = quality["slices"].get("worst")
    if worst:
        metric = "mae" if "mae" in worst else "accuracy"
        parts.append(f"worst slice {worst['column']}={worst['value']} {metric} {worst[metric]:.4f}")
    features = quality["importance"].get("features")
    if features:
        parts.append(f"top feature {features[0]['name']}")
    return ", ".join(parts) or "per-class metrics"


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
        ds = load_dataset(spec, st)
        regression = ds.task == "regression"
        if regression and spec.recipe not in ("tabular", "torch"):
            raise DataError(f"the schema says task = \"regression\"; the {spec.recipe} recipe builds classifiers: "
                            "use --recipe tabular (or torch with a model of one output)")
        if regression and spec.min_slice_metric is not None:
            raise DataError("--min-slice-metric is an accuracy a classifier's worst slice must reach; a regression "
                            "build reports MAE per slice instead: leave --min-slice-metric out")
        report, kept = validate(ds)
        splits_local = datamod.split_indices(datamod.strata(ds)[kept], spec.seed)
        splits = {k: kept[v] for k, v in splits_local.items()}
        check_leakage(report, ds, splits["train"], splits["test"])
        sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        st.note(f"{report.rows_kept}/{report.rows_in} rows kept, {sizes}")
    fs = feature_set(spec, ds, report, kept)
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
        model, preprocessing, needs_training = torch_model(spec, ds, xs["train"], fs)
        if needs_training:
            from toolchain.train import TrainConfig, device_name, resolve_device, train

            if regression:  # learn the standardised target, output it in its own units (toolchain/regression.py)
                from toolchain.regression import Destandardized

                model = Destandardized(model, float(ys["train"].mean()), float(ys["train"].std()) or 1.0)
            cfg = TrainConfig(epochs=spec.epochs or (30 if spec.recipe == "digits" else 60), seed=spec.seed,
                              task=ds.task)
            with rep.step("train", total=cfg.epochs) as st:
                result = train(model, (xs["train"], ys["train"]), (xs["validation"], ys["validation"]), cfg,
                               spec.workdir / "checkpoints", data_digest=ds.sha256, resume=spec.resume,
                               on_epoch=lambda r: st.advance(), device=spec.device)
                if result.resumed_from:
                    rep.info(f"resumed from the checkpoint of epoch {result.resumed_from}")
                last = result.history[-1]
                st.note(f"{cfg.epochs} epochs, validation MAE {last.val_mae:.4g}" if regression else
                        f"{cfg.epochs} epochs, validation accuracy {last.val_accuracy:.4f}")
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
                domains = user_onnx(spec, ds, fp32, xs["test"], build_report, rep)
                st.note(f"output {build_report['onnx_input']['output']!r}")
            fp32_input = input_name(fp32)
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
                    profiles=[ShapeRange(input=fp32_input, min=[1, *shape], opt=[1, *shape], max=[32, *shape])],
                    compute_capabilities=_TRT_CAPABILITIES, min_tensorrt="10.0", validated_on=[],
                ),
            ))

        with rep.step("evaluate on the test split", total=len(candidates)) as st:
            for c in candidates:
                c.evaluation = evaluate(c.path, c.runtime, xs["test"], ys["test"], task=ds.task)
                st.advance()
        evals = {c.name: _evaluated(c) for c in candidates}
        base = evals[candidates[0].name]
        rejected: dict[str, str] = {}
        for c in candidates[1:]:
            ev = evals[c.name]
            why = (error_gate(ev.mae, base.mae, spec.max_drop) if regression else
                   gate(ev.accuracy or 0.0, base.accuracy or 0.0, spec.max_drop))
            if why:
                rejected[c.name] = why
        build_report["rejected"] = rejected
        kept_c = [c for c in candidates if c.name not in rejected]

        with rep.step("quality: per-class metrics, slices, feature importance") as st:
            quality = (_regression_quality(spec, ds, candidates[0].name, fp32, base, xs, ys, segs) if regression
                       else _quality(spec, ds, candidates[0].name, fp32, base, xs, ys, segs))
            build_report.update(quality)
            st.note(_quality_note(quality))

        with rep.step("reference profile and golden vectors") as st:
            train_out = open_backend(fp32, "onnxruntime").predict(xs["train"])
            # a regression profile's class counts and confidence are replaced by its output bins just below
            y_ref, n_cls = (np.zeros(len(train_out), np.int64), 1) if regression else (ys["train"], len(ds.classes))
            probs = np.ones((len(train_out), 1)) if regression else softmax(train_out)
            feature_names = [f.name for f in ds.schema.features] if ds.kind == "tabular" else None
            if fs is not None:
                from toolchain.features import reference_for

                reference = reference_for(fs, xs["train"], y_ref, n_cls, probs)
            else:
                reference = reference_profile(xs["train"], ds.kind, feature_names, y_ref, n_cls, probs)
            if regression:
                from toolchain.regression import golden_rows, with_output_bins

                reference = with_output_bins(reference, train_out)
                gi = golden_rows(ys["test"])
                golden_labels = None
            else:
                gi = golden_indices(ys["test"])
                golden_labels = [int(v) for v in base.outputs[gi].argmax(1)]
            golden = GoldenSet(inputs=[[float(v) for v in xs["test"][i].ravel()] for i in gi], labels=golden_labels)
            st.note(f"{len(reference.features)} features, {len(gi)} golden inputs")

        entries = []
        files: dict[str, Path] = {}
        for c in kept_c:
            ev = evals[c.name]
            outputs = ev.outputs[gi]
            if golden_labels is None:  # regression: a tolerance in the target's units, no top-1 agreement
                from toolchain.regression import smoke_atol

                smoke = SmokeExpectation(outputs=[[float(v) for v in row] for row in outputs],
                                         atol=smoke_atol(ys["train"], outputs, c.target, c.precision))
            else:
                agreement = float((outputs.argmax(1) == np.array(golden_labels)).mean())
                span = float(np.abs(outputs).max()) or 1.0
                atol = (1e-3 * span if c.precision is Precision.FP32 and c.target is not Target.TENSORRT
                        else 0.05 * span)
                smoke = SmokeExpectation(outputs=[[float(v) for v in row] for row in outputs], atol=atol,
                                         min_agreement=agreement)
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
            metrics = ev.metrics() | ({"mae_rise": round(ev.mae - base.mae, 6)} if regression else
                                      {"accuracy_drop_points": round(((base.accuracy or 0.0) - (ev.accuracy or 0.0))
                                                                     * 100, 4)})
            if c.target is Target.TENSORRT:
                metrics["measured_with_onnxruntime"] = 1.0
            entries.append(ArtifactEntry(
                name=c.name, target=c.target, precision=c.precision, sha256=sha, size=c.path.stat().st_size,
                runtime=runtime, inputs=[_tensor(ev.input, "input" if c.runtime != "onnxruntime" else "")],
                outputs=[_tensor(ev.output, "logits" if c.runtime != "onnxruntime" else "")],
                metrics=metrics, tensorrt=c.tensorrt, smoke=smoke,
            ))

        split_digest = hashlib.sha256(b"".join(splits[k].astype("<i8").tobytes() for k in datamod.SPLITS))
        lineage = {
            "recipe": spec.recipe, "dataset_sha256": ds.sha256, "dataset_source": ds.source[-256:],
            "seed": str(spec.seed), "edgeherd": __version__,
            ("max_mae_rise" if regression else "max_drop_points"): str(spec.max_drop),
            "split_sizes": "/".join(str(len(splits[k])) for k in datamod.SPLITS),
            "split_sha256": split_digest.hexdigest(), "onnxruntime": dist_version("onnxruntime"),
        }
        if "training" in build_report:
            lineage["epochs"] = str(build_report["training"]["epochs"])
            lineage["train_device"] = build_report["training"]["device"][:256]
        worst = build_report["slices"].get("worst")
        metric = "mae" if regression else "accuracy"
        if worst:
            lineage["worst_slice"] = (f"{worst['column']}={worst['value']} {metric} {worst[metric]:.4f} "
                                      f"n {worst['n']}")[:256]
        if build_report["importance"].get("features"):
            top = build_report["importance"]["features"][0]
            lineage["top_feature"] = f"{top['name']} {'MAE rise' if regression else 'accuracy drop'} {top['mean']:.4f}"
        if regression:
            lineage["target"] = ds.schema.label
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
            task=ds.task, labels=None if regression else ds.classes, artifacts=entries, preprocessing=preprocessing,
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
