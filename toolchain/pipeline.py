"""``build()``: dataset → validated → trained → exported → quantised → evaluated → signed bundle.

Each step is a function below, reporting to a :class:`Reporter` (the CLI draws rich progress bars); what the
build decides about each artifact lives in toolchain/artifacts.py, the quality sections in
toolchain/quality_report.py. A build that fails at any step raises a :class:`~toolchain.errors.ToolchainError`
and leaves no bundle behind; training checkpoints stay in the work directory so ``resume=True`` continues an
interrupted run.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InferenceError
from protocol import ArtifactEntry, GoldenSet, Manifest, Precision, Preprocessing, ReferenceProfile, Target
from protocol.features import FeatureSet
from protocol.manifest import GOLDEN_VALUES_3, schema_for
from toolchain import data as datamod
from toolchain._quiet import quiet_native_logs
from toolchain.artifacts import (
    Candidate,
    artifact_metrics,
    code_revision,
    lineage,
    runtime_requirement,
    smoke_expectation,
    tensor_spec,
    tensorrt_candidates,
)
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
from toolchain.errors import ConversionError, DataError, ModelError, ToolchainError
from toolchain.evaluate import Evaluation, error_gate, evaluate, gate, predict_all
from toolchain.profile import golden_indices, reference_profile, softmax
from toolchain.quality_report import classification_quality, quality_note, regression_quality
from toolchain.sources import ValidationFailed, feature_set, input_name, load_dataset, torch_model, user_onnx
from toolchain.spec import BuildSpec, NullReporter, Recipe, Reporter
from toolchain.validate import check_leakage, validate

__all__ = ["BuildResult", "BuildSpec", "NullReporter", "Recipe", "Reporter", "ValidationFailed", "build"]


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    report: dict[str, Any]
    tar: Path | None = None
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass
class _Data:
    """The validated dataset and its splits, aligned: ``xs[k]``, ``ys[k]`` and ``segs[k]`` for each split k."""

    ds: datamod.Dataset
    splits: dict[str, np.ndarray]
    xs: dict[str, np.ndarray]
    ys: dict[str, np.ndarray]
    segs: dict[str, dict[str, np.ndarray]]
    fs: FeatureSet | None

    @property
    def regression(self) -> bool:
        return self.ds.task == "regression"


def _check_spec(spec: BuildSpec) -> None:
    """What can be refused before any work: a missing GPU, an occupied output, a missing or non-ONNX model file,
    flags that do not go together."""
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


def _prepare_data(spec: BuildSpec, rep: Reporter) -> tuple[_Data, dict[str, Any]]:
    """Load, validate and split the data; (the data, the report's validation and split sections)."""
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
    data = _Data(ds, splits, {k: ds.x[v] for k, v in splits.items()}, {k: ds.y[v] for k, v in splits.items()},
                 {k: {c: a[v] for c, a in ds.segments.items()} for k, v in splits.items()}, fs)
    return data, {"validation": report.to_dict(), "splits": {k: len(v) for k, v in splits.items()}}


def _train(spec: BuildSpec, d: _Data, rep: Reporter, build_report: dict[str, Any]) -> tuple[Any, Preprocessing]:
    """The torch model (None for an ONNX input) and its preprocessing; trained here when the recipe says so."""
    if spec.recipe == "onnx":
        return None, Preprocessing(kind="none", description="as defined by the supplied ONNX model")
    model, preprocessing, needs_training = torch_model(spec, d.ds, d.xs["train"], d.fs)
    if not needs_training:
        return model, preprocessing
    from toolchain.train import TrainConfig, device_name, resolve_device, train

    if d.regression:  # learn the standardised target, output it in its own units (toolchain/regression.py)
        from toolchain.regression import Destandardized

        model = Destandardized(model, float(d.ys["train"].mean()), float(d.ys["train"].std()) or 1.0)
    cfg = TrainConfig(epochs=spec.epochs or (30 if spec.recipe == "digits" else 60), seed=spec.seed, task=d.ds.task)
    with rep.step("train", total=cfg.epochs) as st:
        result = train(model, (d.xs["train"], d.ys["train"]), (d.xs["validation"], d.ys["validation"]), cfg,
                       spec.workdir / "checkpoints", data_digest=d.ds.sha256, resume=spec.resume,
                       on_epoch=lambda r: st.advance(), device=spec.device)
        if result.resumed_from:
            rep.info(f"resumed from the checkpoint of epoch {result.resumed_from}")
        last = result.history[-1]
        st.note(f"{cfg.epochs} epochs, validation MAE {last.val_mae:.4g}" if d.regression else
                f"{cfg.epochs} epochs, validation accuracy {last.val_accuracy:.4f}")
    build_report["training"] = {"epochs": cfg.epochs, "seed": cfg.seed, "resumed_from": result.resumed_from,
                                "device": device_name(resolve_device(spec.device)),
                                "history": [vars(h) for h in result.history]}
    return model, preprocessing


def _export_onnx(spec: BuildSpec, d: _Data, model: Any, fp32: Path, rep: Reporter, build_report: dict[str, Any]
                 ) -> tuple[list[str], list[str]]:
    """The fp32 ONNX model at ``fp32``: exported from torch (checked against it), or the user's, prepared;
    (the operator domains beyond the default ONNX one, the ``ai.onnx.ml`` operators) it uses."""
    with rep.step("export ONNX") as st:
        if model is None:
            domains = user_onnx(spec, d.ds, fp32, d.xs["test"], build_report, rep)
            st.note(f"output {build_report['onnx_input']['output']!r}")
            return domains, list(build_report["onnx_input"].get("operators") or [])
        from toolchain.export import export_onnx, torch_logits

        export_onnx(model, d.xs["test"], fp32)
        parity = float(np.abs(predict_all(fp32, d.xs["test"], batch=256) - torch_logits(model, d.xs["test"])).max())
        build_report["onnx_parity_max_abs_diff"] = parity
        st.note(f"max abs diff vs torch {parity:.2e}")
        return [], []


def _quantize(name: str, d: _Data, model: Any, fp32: Path, work: Path, domains: list[str], operators: list[str],
              skipped: dict[str, str], rep: Reporter) -> tuple[list[Candidate], Path | None]:
    """The int8 ONNX candidate and the symmetric int8 model TensorRT builds from (None when not made)."""
    with rep.step("quantize ONNX int8 (QDQ, per-channel)") as st:
        from toolchain.quantize import int8_unsupported, quantize_onnx

        int8, sym = work / "model.int8.onnx", work / "model.int8-sym.onnx"
        why_not = int8_unsupported(domains, operators or None)
        if why_not is None:
            try:
                quantize_onnx(fp32, int8, d.xs["calibration"])
                quantize_onnx(fp32, sym, d.xs["calibration"], symmetric=True)
            except ConversionError as exc:
                if model is not None:  # a model this build exported itself: a bug to report, not to skip
                    raise
                why_not = f"{exc}; the fp32 model ships"
        if why_not is None:
            return [Candidate(f"{name}-onnx-int8", Target.ONNX, Precision.INT8, int8, "onnxruntime")], sym
        skipped["onnx-int8"] = why_not
        st.note("skipped")
        return [], None


def _tflite(spec: BuildSpec, name: str, d: _Data, model: Any, work: Path, skipped: dict[str, str],
            rep: Reporter) -> list[Candidate]:
    if model is None:
        skipped["tflite"] = "needs a torch model; an ONNX input cannot be converted here"
        return []
    if not spec.tflite:
        return []
    with rep.step("convert TFLite fp32 and int8 (litert-torch)"):
        from toolchain.export import export_tflite

        tfl, tfl8 = work / "model.tflite", work / "model.int8.tflite"
        export_tflite(model, d.xs["test"], tfl)
        export_tflite(model, d.xs["test"], tfl8, int8_calibration=d.xs["calibration"])
        return [Candidate(f"{name}-tflite-fp32", Target.TFLITE, Precision.FP32, tfl, "ai-edge-litert"),
                Candidate(f"{name}-tflite-int8", Target.TFLITE, Precision.INT8, tfl8, "ai-edge-litert")]


def _evaluate(spec: BuildSpec, d: _Data, candidates: list[Candidate], rep: Reporter) -> dict[str, str]:
    """Each candidate run on the test split with the runtime a device would use; the gate's rejections (name →
    why) against the first candidate, the fp32 ONNX model."""
    with rep.step("evaluate on the test split", total=len(candidates)) as st:
        for c in candidates:
            try:
                c.evaluation = evaluate(c.path, c.runtime, d.xs["test"], d.ys["test"], task=d.ds.task)
            except InferenceError as exc:
                raise ModelError(f"{c.name} cannot run on the test split: {exc}") from None
            st.advance()
    base = candidates[0].evaluated
    rejected: dict[str, str] = {}
    for c in candidates[1:]:
        ev = c.evaluated
        why = (error_gate(ev.mae, base.mae, spec.max_drop) if d.regression else
               gate(ev.accuracy or 0.0, base.accuracy or 0.0, spec.max_drop))
        if why:
            rejected[c.name] = why
    return rejected


#: Values in all golden inputs together: an image model's raw pixels get fewer golden inputs (two of 128×128×3),
#: so that the signed manifest, which travels in one MQTT message, stays well under its 1 MiB.
GOLDEN_TOTAL_VALUES = 98_304


def _reference(d: _Data, fp32: Path, base: Evaluation, rep: Reporter
               ) -> tuple[ReferenceProfile, np.ndarray, GoldenSet | None]:
    """The reference profile drift is measured against, and the golden inputs (their indices in the test split,
    the set) every artifact's smoke test runs; no set for inputs larger than a manifest carries
    (protocol.manifest.GOLDEN_VALUES_3)."""
    with rep.step("reference profile and golden vectors") as st:
        xs, ys, ds = d.xs, d.ys, d.ds
        train_out = predict_all(fp32, xs["train"], batch=256)
        # a regression profile's class counts and confidence are replaced by its output bins just below
        y_ref, n_cls = (np.zeros(len(train_out), np.int64), 1) if d.regression else (ys["train"], len(ds.classes))
        probs = np.ones((len(train_out), 1)) if d.regression else softmax(train_out)
        feature_names = [f.name for f in ds.schema.features] if ds.kind == "tabular" else None
        if d.fs is not None:
            from toolchain.features import reference_for

            reference = reference_for(d.fs, xs["train"], y_ref, n_cls, probs)
        else:
            reference = reference_profile(xs["train"], ds.kind, feature_names, y_ref, n_cls, probs)
        golden_labels: list[int] | None
        if d.regression:
            from toolchain.regression import golden_rows, with_output_bins

            reference = with_output_bins(reference, train_out)
            gi = golden_rows(ys["test"])
            golden_labels = None
        else:
            gi = golden_indices(ys["test"])
            golden_labels = [int(v) for v in base.outputs[gi].argmax(1)]
        values = int(np.prod(ds.input_shape))
        if values > GOLDEN_VALUES_3:
            st.note(f"{len(reference.features)} features, no golden inputs (an input holds {values} values)")
            return reference, gi, None
        keep = max(1, min(len(gi), GOLDEN_TOTAL_VALUES // values))  # the manifest stays well under its 1 MiB
        gi = gi[:keep]
        golden_labels = golden_labels[:keep] if golden_labels is not None else None
        golden = GoldenSet(inputs=[[float(v) for v in xs["test"][i].ravel()] for i in gi], labels=golden_labels)
        st.note(f"{len(reference.features)} features, {len(gi)} golden inputs")
    return reference, gi, golden


def _entries(d: _Data, kept: list[Candidate], base: Evaluation, gi: np.ndarray, golden: GoldenSet | None
             ) -> tuple[list[ArtifactEntry], dict[str, Path]]:
    """The manifest's artifact entries, and each artifact's file by its digest."""
    entries, files = [], {}
    for c in kept:
        ev = c.evaluated
        sha = sha256_file(c.path)
        files[sha] = c.path
        entries.append(ArtifactEntry(
            name=c.name, target=c.target, precision=c.precision, sha256=sha, size=c.path.stat().st_size,
            runtime=runtime_requirement(c),
            inputs=[tensor_spec(ev.input, "input" if c.runtime != "onnxruntime" else "")],
            outputs=[tensor_spec(ev.output, "logits" if c.runtime != "onnxruntime" else "")],
            metrics=artifact_metrics(ev, base, c, d.regression), tensorrt=c.tensorrt,
            smoke=None if golden is None else smoke_expectation(c, ev.outputs[gi], golden.labels, d.ys["train"]),
        ))
    return entries, files


def build(spec: BuildSpec, reporter: Reporter | None = None) -> BuildResult:
    quiet_native_logs()
    rep = reporter or NullReporter()
    key = load_signing_key(spec.key)  # fail before any work, not after training
    _check_spec(spec)
    d, build_report = _prepare_data(spec, rep)
    name = spec.name or d.ds.name
    model, preprocessing = _train(spec, d, rep, build_report)

    with bundle_staging(spec.out) as staging:
        work = staging / ".work"
        work.mkdir()
        #: Targets not built, and why (the report's "skipped", the model card's "Not built").
        skipped: dict[str, str] = {}
        fp32 = work / "model.onnx"
        domains, operators = _export_onnx(spec, d, model, fp32, rep, build_report)
        candidates = [Candidate(f"{name}-onnx-fp32", Target.ONNX, Precision.FP32, fp32, "onnxruntime")]
        int8, sym = _quantize(name, d, model, fp32, work, domains, operators, skipped, rep)
        candidates += int8
        candidates += _tflite(spec, name, d, model, work, skipped, rep)
        candidates += tensorrt_candidates(name, fp32, sym, domains, input_name(fp32), list(d.ds.input_shape),
                                          skipped)
        if skipped:
            build_report["skipped"] = skipped

        rejected = _evaluate(spec, d, candidates, rep)
        build_report["rejected"] = rejected
        base = candidates[0].evaluated
        with rep.step("quality: per-class metrics, slices, feature importance") as st:
            quality = (regression_quality if d.regression else classification_quality)(
                spec, d.ds, candidates[0].name, fp32, base, d.xs, d.ys, d.segs)
            build_report.update(quality)
            st.note(quality_note(quality))
        reference, gi, golden = _reference(d, fp32, base, rep)
        if golden is None:
            build_report.setdefault("skipped", {})["smoke"] = (
                f"an input holds {int(np.prod(d.ds.input_shape))} values; a manifest carries golden inputs of at "
                f"most {GOLDEN_VALUES_3}, so devices install this model without the golden smoke test")
        entries, files = _entries(d, [c for c in candidates if c.name not in rejected], base, gi, golden)

        lin = lineage(spec, d.ds, d.splits, build_report, trained_torch=model is not None, revision=code_revision())
        if d.fs is not None:
            from toolchain.features import feature_lineage

            lin.update(feature_lineage(d.fs))
        manifest = Manifest(
            schema_=schema_for(reference, golden), model=name, version=spec.version,
            created_at=datetime.now(timezone.utc), author=spec.author,
            description=spec.description or f"{spec.recipe} model trained on {d.ds.name}",
            task=d.ds.task, labels=None if d.regression else d.ds.classes, artifacts=entries,
            preprocessing=preprocessing, golden=golden, reference=reference, lineage=lin, features=d.fs,
        )
        with rep.step("sign and write the bundle"):
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
