"""The feature registry: versioned feature definitions, who consumes them, and their drift across the fleet.

A definition is registered once per ``(name, version)``; pushing the same
version with other contents is refused (a changed definition is a new
version), so a bundle built before a change still names, and is checked
against, the version it was built with. ``edgeherd model push`` registers the
definitions a bundle carries and refuses one that contradicts the registry.

Drift of one feature is read from the statistics devices report (keyed by
feature name and version), for every model version that consumes it: each
feature's bins split its declared range evenly, so the counts of windows from
different model versions add up, and the fleet-wide row compares them with
the summed training counts of those versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlmodel import Session, col, select

from protocol import FeatureStats, InvalidMessage, decode, decode_model
from protocol.features import FeatureDefinition, definition_sha256
from protocol.manifest import FeatureReference
from protocol.signing import SignedManifest
from server import audit
from server.db.models import AuditEntry, FeatureDefinitionRow, ModelVersion, StatsWindow
from server.drift import ALPHA, FeatureDrift, score_feature
from server.errors import ServerError

__all__ = ["Consumer", "FeatureDriftRow", "FeatureRegistryError", "consumers", "definitions", "drift", "register"]


class FeatureRegistryError(ServerError):
    pass


def register(db: Session, defs: list[FeatureDefinition], actor: str
             ) -> tuple[list[tuple[str, str]], AuditEntry | None]:
    """Register definitions (the caller commits, then anchors the audit entry returned): ``(ref, "added" |
    "unchanged")`` for each. Raises FeatureRegistryError, changing nothing, when one contradicts a registered
    version."""
    out: list[tuple[str, str]] = []
    entry: AuditEntry | None = None
    fresh: list[tuple[FeatureDefinition, str]] = []
    for d in defs:
        digest = definition_sha256(d)
        row = db.get(FeatureDefinitionRow, (d.name, d.version))
        if row is not None:
            if row.sha256 != digest:
                raise FeatureRegistryError(
                    f"{d.ref} is already registered with another definition (sha256 {row.sha256[:12]}…); a changed "
                    f"definition is a new version: give it version {_next_version(db, d.name)}")
            out.append((d.ref, "unchanged"))
        elif any(f.name == d.name and f.version == d.version for f, _ in fresh):
            raise FeatureRegistryError(f"{d.ref} is given twice")
        else:
            fresh.append((d, digest))
            out.append((d.ref, "added"))
    for d, digest in fresh:
        db.add(FeatureDefinitionRow(name=d.name, version=d.version, sha256=digest,
                                    definition=d.model_dump(mode="json"), owner=d.owner, pushed_by=actor))
        entry = audit.append(db, actor, "feature.push", f"feature:{d.ref}", {"sha256": digest, "owner": d.owner})
    return out, entry


def _next_version(db: Session, name: str) -> int:
    versions = db.exec(select(FeatureDefinitionRow.version).where(FeatureDefinitionRow.name == name)).all()
    return max(versions, default=0) + 1


def definitions(db: Session, name: str | None = None) -> list[FeatureDefinitionRow]:
    q = select(FeatureDefinitionRow).order_by(col(FeatureDefinitionRow.name), col(FeatureDefinitionRow.version))
    if name is not None:
        q = q.where(FeatureDefinitionRow.name == name)
    return list(db.exec(q).all())


@dataclass(frozen=True)
class Consumer:
    model: str  # name:version
    manifest_sha256: str
    feature: str  # name@version
    reference: FeatureReference
    reference_n: int


def consumers(db: Session, name: str | None = None) -> list[Consumer]:
    """Model versions whose bundles compute registry features (``name``'s only, if given)."""
    out = []
    for mv in db.exec(select(ModelVersion).order_by(col(ModelVersion.id))).all():
        if "features" not in (mv.lineage or {}):  # built from registry features: the lineage says which
            continue
        try:
            manifest = decode_model(SignedManifest, mv.signed_manifest).manifest
        except InvalidMessage:  # verified when pushed; a row edited since is not this function's to judge
            continue
        if manifest.features is None or manifest.reference is None:
            continue
        for ref in manifest.reference.features:
            if name is None or ref.name == name:
                out.append(Consumer(f"{mv.name}:{mv.version}", mv.manifest_sha256, f"{ref.name}@{ref.version}", ref,
                                    manifest.reference.n))
    return out


@dataclass(frozen=True)
class FeatureDriftRow:
    feature: str  # name@version
    model: str  # name:version, or "all" for every consumer of that feature version
    windows: int
    drift: FeatureDrift

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "model": self.model, "windows": self.windows} | vars(self.drift)


def drift(db: Session, name: str, version: int | None = None, since: datetime | None = None,
          alpha: float = ALPHA) -> list[FeatureDriftRow]:
    """Drift of feature ``name`` per consuming model version and, per feature version, over all of them."""
    rows: list[FeatureDriftRow] = []
    groups: dict[str, list[tuple[Consumer, _Counted]]] = {}
    for c in consumers(db, name):
        if version is not None and c.feature != f"{name}@{version}":
            continue
        counted = _window_counts(db, c, since)
        groups.setdefault(c.feature, []).append((c, counted))
        rows.append(FeatureDriftRow(c.feature, c.model, counted.windows,
                                    _score(c.feature, [c], [counted], alpha)))
    for feature, members in groups.items():
        if len(members) < 2:
            continue
        rows.append(FeatureDriftRow(feature, "all", sum(m.windows for _, m in members),
                                    _score(feature, [c for c, _ in members], [m for _, m in members], alpha)))
    return rows


@dataclass
class _Counted:
    """A feature's summed window counts: inside its range, below, above, missing; and how many windows."""

    counts: np.ndarray
    below: int = 0
    above: int = 0
    nan: int = 0
    windows: int = 0


def _score(feature: str, refs: list[Consumer], counted: list[_Counted], alpha: float) -> FeatureDrift:
    """The feature's drift over the summed counts of ``counted`` against the summed references of ``refs``: a
    registry feature's reference counts values beyond its declared range in its end bins, so the window's are
    folded the same way, and their rate and the missing rate are tested against the reference's own."""
    return score_feature(feature, np.sum([np.asarray(c.reference.counts) for c in refs], axis=0),
                         np.sum([m.counts for m in counted], axis=0), sum(c.reference_n for c in refs),
                         sum(m.nan for m in counted), 1, alpha, below=sum(m.below for m in counted),
                         above=sum(m.above for m in counted), fold=True,
                         ref_nan=sum(c.reference.nan or 0 for c in refs),
                         ref_outside=sum(c.reference.outside or 0 for c in refs))


def _window_counts(db: Session, c: Consumer, since: datetime | None) -> _Counted:
    """The summed bin counts, values below and above the range, missing values and windows of ``c``'s feature in
    the statistics devices running ``c``'s model version reported."""
    q = select(StatsWindow.payload).where(StatsWindow.manifest_sha256 == c.manifest_sha256)
    if since is not None:
        q = q.where(col(StatsWindow.end) >= since)
    name, _, v = c.feature.partition("@")
    out = _Counted(np.zeros(len(c.reference.counts), dtype=np.int64))
    for payload in db.exec(q.execution_options(yield_per=500)):
        try:
            stats = decode(FeatureStats, payload)
        except InvalidMessage:
            continue
        for f in stats.features:
            if f.name == name and f.version == int(v) and len(f.counts) == len(out.counts):
                out.counts += np.asarray(f.counts, dtype=np.int64)
                out.below += f.below
                out.above += f.above
                out.nan += f.nan
                out.windows += 1
    return out
