"""Registry features in a build: definitions from TOML, checks on the data, and the transformation as a
torch module that is exported into the model's graph.

Definitions live in TOML files (one ``[[feature]]`` table each, reviewable in
git) and are registered on the server with ``edgeherd features push``. A
tabular schema names the ones a model consumes (``registry_features =
["vibration_ratio@2", "load_log"]``; without ``@version``, the highest one in
the file); ``edgeherd build --features FILE`` resolves them. The build checks
every feature's declared range and missing rate on the data (fatal or warning
per feature), bakes the transformations into the exported graph ahead of the
network, records the exact definitions in the manifest (``features``) and
their versions and digests in the lineage, and profiles each feature on
evenly split bins of its declared range, so drift is comparable across model
versions that consume it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from agent.features import feature_values, reference_edges, window_summary
from protocol.features import (
    Clip,
    FeatureDefinition,
    FeatureSet,
    Identity,
    Log1p,
    OneHot,
    Ratio,
    Scale,
    Window,
    definition_sha256,
)
from protocol.manifest import ReferenceProfile
from protocol.tomlfile import read_toml
from toolchain.errors import DataError

__all__ = ["FeatureCheck", "check_features", "feature_lineage", "load_definitions", "reference_for", "resolve",
           "transform_module"]

MAX_DEFINITION_FILE = 1024 * 1024


def load_definitions(path: Path) -> list[FeatureDefinition]:
    """Every ``[[feature]]`` of a TOML file (or of every ``*.toml`` in a directory), validated; a bad one
    raises DataError naming the file, the feature and the key."""
    files = sorted(path.glob("*.toml")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path} holds no .toml feature definitions")
    out: list[FeatureDefinition] = []
    for file in files:
        if file.is_file() and file.stat().st_size > MAX_DEFINITION_FILE:
            raise DataError(f"{file} is larger than {MAX_DEFINITION_FILE} bytes")
        raw = read_toml(file, "feature definitions file", DataError)
        extra = sorted(set(raw) - {"feature"})
        if extra:
            raise DataError(f"{file}: unknown top-level key(s) {', '.join(extra)}; definitions go in "
                            "[[feature]] tables")
        tables = raw.get("feature", [])
        if not isinstance(tables, list) or not tables:
            raise DataError(f"{file}: no [[feature]] tables")
        for i, table in enumerate(tables):
            label = table.get("name", f"#{i + 1}") if isinstance(table, dict) else f"#{i + 1}"
            try:
                out.append(FeatureDefinition.model_validate(table))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
                raise DataError(f"{file}: feature {label}: {where or 'definition'}: {first['msg']}") from None
    seen: dict[tuple[str, int], str] = {}
    for d in out:
        digest = definition_sha256(d)
        if seen.setdefault((d.name, d.version), digest) != digest:
            raise DataError(f"{d.ref} is defined twice, differently; a changed definition needs a new version")
    return out


def resolve(definitions: list[FeatureDefinition], refs: list[str]) -> list[FeatureDefinition]:
    """The definitions ``refs`` name (``name`` for the highest version, or ``name@version``), in order."""
    picked = []
    for ref in refs:
        name, _, version = ref.partition("@")
        found = [d for d in definitions if d.name == name]
        if not found:
            known = ", ".join(sorted({d.name for d in definitions}))
            raise DataError(f"feature {name!r} is not defined (defined: {known})")
        if version:
            if not (version.isascii() and version.isdigit()):
                raise DataError(f"feature reference {ref!r}: the version after '@' is a whole number")
            match = [d for d in found if d.version == int(version)]
            if not match:
                raise DataError(f"feature {name} has no version {version} (versions: "
                                f"{', '.join(str(d.version) for d in sorted(found, key=lambda d: d.version))})")
            picked.append(match[0])
        else:
            picked.append(max(found, key=lambda d: d.version))
    names = [d.name for d in picked]
    if len(set(names)) != len(names):
        raise DataError("a model consumes one version of each feature; a feature is named twice")
    return picked


class FeatureCheck:
    """One feature's numbers on a dataset."""

    def __init__(self, d: FeatureDefinition, values: np.ndarray) -> None:
        self.definition = d
        n = len(values)
        missing = ~np.isfinite(values)
        lo, hi = (float(np.float32(b)) for b in d.bounds)  # the values are float32: so are the bounds
        finite = values[~missing]
        self.n = n
        self.missing_rate = float(missing.mean()) if n else 0.0
        self.out_of_range_rate = float(((finite < lo) | (finite > hi)).sum() / n) if n else 0.0

    @property
    def problems(self) -> list[str]:
        d, out = self.definition, []
        if self.missing_rate > d.max_missing + 1e-12:
            out.append(f"{self.missing_rate:.2%} missing, the definition allows {d.max_missing:.2%}")
        if self.out_of_range_rate > d.max_out_of_range + 1e-12:
            lo, hi = d.bounds
            out.append(f"{self.out_of_range_rate:.2%} outside [{lo:g}, {hi:g}], the definition allows "
                       f"{d.max_out_of_range:.2%}")
        return out


def check_features(fs: FeatureSet, x: np.ndarray) -> list[FeatureCheck]:
    values = feature_values(fs, x)
    return [FeatureCheck(d, values[:, j]) for j, d in enumerate(fs.definitions)]


def reference_for(fs: FeatureSet, x_train: np.ndarray, y_train: np.ndarray, classes: int,
                  probs_train: np.ndarray) -> ReferenceProfile:
    """The training distribution of each feature, on the bins of its declared range (values beyond it in the
    end bins, as the server counts devices' values)."""
    from toolchain.profile import feature_reference, profile_of

    values = feature_values(fs, x_train)
    refs = [feature_reference(d.name, values[:, j], reference_edges(d), version=d.version, fold_outside=True)
            for j, d in enumerate(fs.definitions)]
    return profile_of("features", refs, y_train, classes, probs_train)


def feature_lineage(fs: FeatureSet) -> dict[str, str]:
    """Lineage entries: the exact versions, and one digest over the definitions."""
    import hashlib

    digest = hashlib.sha256("".join(definition_sha256(d) for d in fs.definitions).encode()).hexdigest()
    refs = ",".join(d.ref for d in fs.definitions)
    return {"features": refs[:256], "features_sha256": digest}


def transform_module(fs: FeatureSet) -> Any:
    """A torch module computing :func:`protocol.features.model_columns` in the graph, op for op."""
    import torch

    class FeatureTransform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fs = fs
            self.index = {name: i for i, name in enumerate(fs.inputs)}

        def _col(self, x: torch.Tensor, name: str) -> torch.Tensor:
            """A raw column; ±inf counts as missing (NaN), as in agent.features."""
            i = self.index[name]
            v = x[:, i : i + 1]
            return v + (v - v)  # inf - inf is NaN; anything finite is unchanged. No NaN constant in the graph:
            # int8 calibration cannot give one a scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            cols: list[torch.Tensor] = []
            for d in self.fs.definitions:
                t = d.transform
                if isinstance(t, OneHot):
                    v = self._col(x, t.column)
                    cols += [(v == float(np.float32(c))).to(torch.float32) for c in t.categories]
                    continue
                fill = float(np.float32(d.fill))
                if isinstance(t, Ratio):  # missing (a zero denominator) becomes the fill value at once: the graph
                    num, den = self._col(x, t.numerator), self._col(x, t.denominator)  # holds no NaN constant
                    ok = torch.abs(den) >= float(np.float32(t.eps))
                    safe = torch.where(ok, den, torch.ones_like(den))
                    v = torch.where(ok, num / safe, torch.full_like(num, fill))
                elif isinstance(t, Window):  # the one implementation, given torch
                    v = window_summary(torch, t, [self._col(x, c) for c in t.columns], 0.0, fill)
                else:
                    v = self._col(x, t.column)
                    if isinstance(t, Scale):
                        v = (v - float(np.float32(t.offset))) * float(np.float32(t.factor))
                    elif isinstance(t, Clip):
                        v = torch.clamp(v, float(np.float32(t.min)), float(np.float32(t.max)))
                    elif isinstance(t, Log1p):
                        v = torch.log1p(torch.clamp(v, min=0.0))
                    else:
                        assert isinstance(t, Identity)  # noqa: S101
                cols.append(torch.where(torch.isnan(v), torch.full_like(v, fill), v))
            return torch.cat(cols, dim=1)

    return FeatureTransform()
