"""Where a build's data and model come from: the dataset a spec names (file, SQL, built-in), the torch model
to train or load, a user's ONNX model prepared for the build, and the registry features the schema asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import open_backend
from protocol import Preprocessing
from protocol.features import FeatureSet
from toolchain import data as datamod
from toolchain.errors import DataError, ModelError
from toolchain.spec import BuildSpec, Reporter
from toolchain.validate import ValidationReport

__all__ = ["ValidationFailed", "feature_set", "input_name", "load_dataset", "torch_model", "user_onnx"]


class ValidationFailed(DataError):
    def __init__(self, report: ValidationReport) -> None:
        super().__init__(f"data validation failed: {report.summary()}")
        self.report = report


def load_dataset(spec: BuildSpec, progress: Any = None) -> datamod.Dataset:
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
        raise DataError(f"the {spec.recipe} recipe needs a dataset: --data FILE (.csv, .parquet or .npz), --data "
                        "DIR (an image folder) or --sql URL --query SELECT")
    if spec.data.is_dir():
        from toolchain.images import load_image_folder

        if spec.schema is not None:
            raise DataError(f"{spec.data} is an image folder: its classes are its sub-folders, and --schema "
                            "describes tables only; leave --schema out")
        return load_image_folder(spec.data, spec.image_size)
    if spec.image_size is not None:
        raise DataError(f"--image-size sets the size of an image folder's images; {spec.data} is a file")
    if spec.data.suffix.lower() == ".npz":
        return datamod.load_npz(spec.data)
    if spec.schema is None:
        raise DataError(f"{spec.data} needs a schema: --schema FILE.toml (label, features, ranges)")
    return datamod.load_table(spec.data, datamod.load_schema(spec.schema))


def torch_model(spec: BuildSpec, ds: datamod.Dataset, train_x: np.ndarray, fs: FeatureSet | None = None
                 ) -> tuple[Any, Preprocessing, bool]:
    """(model, preprocessing, needs_training)."""
    import torch

    from toolchain.models import DigitsCNN, Normalized, TabularMLP, load_user_model

    torch.manual_seed(spec.seed)  # initial weights are part of the seeded run

    if spec.recipe == "torch":
        if spec.model is not None and "capture_size" in ds.extra:  # an image folder: train it, pixels in
            from toolchain.vision import image_model

            model, pre = image_model(spec.model, spec.model_args, spec.weights, ds, train_x,
                                     spec.input_size)
            return model, pre, True
        if spec.model is None or spec.weights is None:
            raise ModelError("the torch recipe needs --model module:Class and --weights FILE (or --data DIR, an "
                             "image folder, to train --model on it)")
        return load_user_model(spec.model, spec.weights, spec.model_args), Preprocessing(
            kind="none", description="as defined by the supplied model"), False
    if spec.recipe == "digits" or ds.kind == "image":
        mean_px, std_px = float(train_x.mean()), float(train_x.std()) or 1.0
        core = DigitsCNN(len(ds.classes)) if ds.input_shape == (1, 8, 8) else None
        if core is None:
            raise ModelError(f"no built-in model for images shaped {ds.input_shape}; bring one with the torch "
                             "recipe and --model (e.g. --model toolchain.models:mobilenet_v3_small)")
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
    # a regression dataset has no classes: one output (the build de-standardises it, toolchain/regression.py)
    net = Normalized(TabularMLP(flat.shape[1], len(ds.classes) or 1), mean, std)
    if fs is not None:
        return torch.nn.Sequential(transform_module(fs), net), pre, True
    return net, pre, True


def input_name(path: Path) -> str:
    backend = open_backend(path, "onnxruntime")
    try:
        return backend.input.name
    finally:
        backend.close()


def user_onnx(spec: BuildSpec, ds: datamod.Dataset, fp32: Path, sample: np.ndarray, build_report: dict[str, Any],
               rep: Reporter) -> list[str]:
    """Write the user's ONNX model to ``fp32`` with its scores output alone (toolchain/onnx_input.py) and check
    it runs on the dataset; records "onnx_input" in the report and returns the operator domains it uses beyond
    the default ONNX one."""
    from toolchain.onnx_input import prepare_onnx

    src = spec.onnx
    if src is None:
        raise ModelError("the onnx recipe needs --onnx FILE")
    prepared = prepare_onnx(src, fp32, spec.output, row_shape=tuple(sample.shape[1:]), classes=len(ds.classes))
    build_report["onnx_input"] = {"source_output": prepared.source_output, "output": prepared.output,
                                  "zipmap_removed": prepared.zipmap, "dropped_outputs": prepared.dropped,
                                  "operator_domains": prepared.domains, "operators": prepared.operators,
                                  "notes": prepared.notes()}
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


def feature_set(spec: BuildSpec, ds: datamod.Dataset, report: ValidationReport, kept: np.ndarray
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
