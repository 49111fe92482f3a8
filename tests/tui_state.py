"""A registry database in one fixed state (fixed ids, times, numbers), so every TUI screen renders the same
every time: for the snapshot tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlmodel import Session

from server import audit
from server.db.models import (
    Alert,
    Approval,
    ArtifactRow,
    AuditEntry,
    Device,
    DriftReportRow,
    GateEvaluation,
    ModelVersion,
    Rollout,
    RolloutDevice,
    TelemetryRow,
    VersionArtifact,
)
from server.registry import Registry
from server.rollouts import RolloutSpec

NOW = datetime(2026, 11, 2, 9, 30, tzinfo=timezone.utc)
V1, V2 = "1" * 64, "2" * 64
OPERATORS = """
production_groups = ["prod"]

[[operator]]
name = "alice"
role = "approver"

[[operator]]
name = "bob"
role = "approver"

[[operator]]
name = "dave"
role = "viewer"
"""

CARD = """# digits 1.1.0

Handwritten digit classifier (8×8), int8 and fp32.

| artifact | accuracy |
|---|---|
| digits-onnx-fp32 | 0.9722 |
| digits-onnx-int8 | 0.9694 |
"""


def _feature(name: str, ratio: float) -> dict[str, object]:
    return {"name": name, "n": 50, "psi": 0.1 * ratio, "psi_threshold": 0.1, "js": 0.01, "chi2": 3.0, "df": 9,
            "p_value": 0.5, "nan_rate": 0.0, "drifted": ratio >= 1}


def fill(data: Path) -> Registry:
    """Write the fixed state into ``data`` (a server data dir with keys) and return its registry."""
    (data / "operators.toml").write_text(OPERATORS)
    reg = Registry(data)
    with Session(reg.engine) as db:
        for i, (ver, digest, stage, card) in enumerate((("1.0.0", V1, "deployed", None), ("1.1.0", V2, "candidate",
                                                                                           CARD))):
            db.add(ModelVersion(id=i + 1, name="digits", version=ver, manifest_sha256=digest, signed_manifest=b"{}",
                                stage=stage, author="alice", lineage={"dataset_sha256": "ab" * 8, "seed": 7},
                                card=card, created_at=NOW - timedelta(days=2 - i)))
        db.flush()
        for vid in (1, 2):
            for name, acc in (("digits-onnx-fp32", 0.9722), ("digits-onnx-int8", 0.9694 - 0.001 * vid)):
                db.add(ArtifactRow(sha256=f"{vid}{name[-1]}" * 32, size=1000, location="store"))
                db.flush()
                db.add(VersionArtifact(version_id=vid, name=name, sha256=f"{vid}{name[-1]}" * 32, target="onnx",
                                       precision=name.rsplit("-", 1)[1], runtime="onnxruntime",
                                       metrics={"accuracy": acc}))
        db.add(Approval(version_id=1, actor="bob", decision="approve", reason="canary clean for a week",
                        at=NOW - timedelta(days=1)))
        profiles = ["raspberry-pi-5", "raspberry-pi-4", "jetson-orin-nano", "x86-64"]
        for i in range(12):  # each seen within the 180 s that count as online (server/presence.py)
            did = f"{'pi' if i < 8 else 'jet'}-{i:02d}"
            online = i not in (5, 11)
            running = V2 if i < 2 else V1
            db.add(Device(id=did, profile=profiles[i % 4], groups=["prod" if i % 3 == 0 else "lab"],
                          tags=["kitchen"] if i % 2 else ["garage"], status="online" if online else "offline",
                          last_seen=NOW - timedelta(seconds=5 + 15 * i), running_manifest=running,
                          running_artifact="digits-onnx-int8", install_step="failed" if i == 7 else "done",
                          install_error="smoke test failed: accuracy 0.41" if i == 7 else None,
                          desired_manifest=running, desired_artifact="digits-onnx-int8", desired_generation=1,
                          fingerprint={"arch": "aarch64" if i < 8 else "x86_64", "cpu_count": 4,
                                       "python": "3.11.2", "os": "Debian 12"},
                          created_at=NOW - timedelta(days=10)))
            for w in range(6):
                errors = 3 if i == 3 else 0
                db.add(TelemetryRow(device_id=did, session=1, window_seq=w, start=NOW - timedelta(minutes=4 - w / 2),
                                    end=NOW - timedelta(minutes=3.5 - w / 2), manifest_sha256=running, requests=100,
                                    errors=errors, p95_ms=4.0 + i * 0.5 + w * 0.1, p50_ms=2.0, p99_ms=9.0,
                                    received_at=NOW - timedelta(minutes=3.5 - w / 2)))
            ratio = 1.7 if i == 4 else 0.2 + 0.05 * i
            db.add(DriftReportRow(scope="device", device_id=did, manifest_sha256=running, n=50, drifted=ratio >= 1,
                                  worst="pixel_13", score=ratio, computed_at=NOW - timedelta(minutes=1),
                                  report={"features": [_feature("pixel_13", ratio), _feature("pixel_42", ratio / 2)]}))
        for k in range(8):
            db.add(DriftReportRow(scope="fleet", manifest_sha256=V1, n=500, drifted=k > 5, worst="pixel_13",
                                  score=0.3 + 0.15 * k, computed_at=NOW - timedelta(minutes=8 - k),
                                  report={"features": [_feature("pixel_13", 0.3 + 0.15 * k),
                                                       _feature("pixel_42", 0.2)]}))
        db.add(Alert(kind="drift", device_id="pi-04", manifest_sha256=V1, detail={"worst": "pixel_13", "n": 50},
                     raised_at=NOW - timedelta(minutes=2)))
        spec = RolloutSpec(soak_s=600).model_dump(mode="json")
        db.add(Rollout(id=1, name="digits-1-1-lab", version_id=2, target={"groups": ["lab"]}, spec=spec,
                       state="running", wave=1, wave_started_at=NOW.timestamp() - 300, created_by="alice",
                       created_at=NOW - timedelta(hours=1), updated_at=NOW))
        db.add(Rollout(id=2, name="digits-1-0-prod", version_id=1, target={"groups": ["prod"]}, production=True,
                       spec=spec, state="completed", wave=3, created_by="bob", created_at=NOW - timedelta(days=1),
                       updated_at=NOW - timedelta(hours=20)))
        db.flush()
        for did, wave, state in (("pi-01", 0, "installed"), ("pi-02", 1, "installed"), ("pi-04", 1, "assigned")):
            db.add(RolloutDevice(rollout_id=1, device_id=did, wave=wave, state=state, previous_manifest=V1,
                                 previous_artifact="digits-onnx-int8", assigned_at=NOW.timestamp() - 900 + 300 * wave,
                                 finished_at=NOW.timestamp() - 600 if state == "installed" else None))
        for gate, verdict, numbers in (("installed", "pass", {"wave_devices": 1, "installed": 1, "failed": 0}),
                                       ("error_rate", "pass", {"new_error_rate": 0.0, "baseline_error_rate": 0.004,
                                                               "limit": 0.014}),
                                       ("latency", "pass", {"new_p95_ms": 4.6, "baseline_p95_ms": 7.1,
                                                            "limit_ms": 8.52})):
            db.add(GateEvaluation(rollout_id=1, wave=0, gate=gate, verdict=verdict, numbers=numbers,
                                  at=NOW - timedelta(minutes=5)))
        db.add(GateEvaluation(rollout_id=1, wave=1, gate="error_rate", verdict="insufficient",
                              numbers={"new_requests": 12, "min_requests": 50}, at=NOW - timedelta(minutes=1)))
        db.flush()
        prev = audit.GENESIS
        trail = [("alice", "model.push", "model:digits:1.0.0", {"author": "alice"}),
                 ("bob", "model.approve", "model:digits:1.0.0", {"reason": "canary clean for a week"}),
                 ("bob", "rollout.create", "rollout:digits-1-0-prod", {"production": True}),
                 ("orchestrator", "rollout.completed", "rollout:digits-1-0-prod", {"devices": 4}),
                 ("alice", "model.push", "model:digits:1.1.0", {"author": "alice"}),
                 ("alice", "model.promote", "model:digits:1.1.0", {}),
                 ("alice", "rollout.create", "rollout:digits-1-1-lab", {"production": False}),
                 ("orchestrator", "rollout.wave_passed", "rollout:digits-1-1-lab", {"wave": 0})]
        for seq, (actor, action, subject, detail) in enumerate(trail, start=1):
            at = NOW - timedelta(hours=len(trail) - seq)
            h = audit.entry_hash(seq, at, actor, action, subject, detail, prev)
            db.add(AuditEntry(seq=seq, at=at, actor=actor, action=action, subject=subject, detail=detail,
                              prev_hash=prev, hash=h))
            prev = h
        db.commit()
    return reg


def fill_many(data: Path, n: int, *, now: datetime = NOW) -> Registry:
    """``n`` devices, each with two recent telemetry windows and a drift report: a big fleet, fast to write."""
    from sqlalchemy import insert

    reg = Registry(data)
    with Session(reg.engine) as db:
        db.add(ModelVersion(id=1, name="digits", version="1.0.0", manifest_sha256=V1, signed_manifest=b"{}",
                            stage="deployed", author="alice", created_at=now))
        db.commit()
    ids = [f"dev-{i:05d}" for i in range(n)]
    devices = [{"id": d, "profile": "raspberry-pi-5", "groups": ["lab" if i % 4 else "prod"], "tags": [],
                "credentials_ref": "", "revoked": False, "status": "online" if i % 50 else "offline",
                "state_session": 1, "state_seq": 1, "last_seen": now - timedelta(seconds=i % 600),
                "running_manifest": V1, "running_artifact": "digits-onnx-int8", "install_step": "done",
                "desired_generation": 1, "desired_manifest": V1, "desired_artifact": "digits-onnx-int8",
                "created_at": now} for i, d in enumerate(ids)]
    telemetry = [{"device_id": d, "session": 1, "window_seq": w, "start": now - timedelta(minutes=2),
                  "end": now - timedelta(minutes=1), "manifest_sha256": V1, "requests": 100, "errors": i % 3,
                  "p95_ms": 3.0 + (i % 17) / 4, "dropped_windows": 0, "received_at": now - timedelta(minutes=1)}
                 for i, d in enumerate(ids) for w in range(2)]
    drift = [{"scope": "device", "device_id": d, "manifest_sha256": V1, "n": 50, "drifted": i % 97 == 0,
              "worst": "c0_mean", "score": (i % 97) / 60, "report": {"features": []}, "computed_at": now}
             for i, d in enumerate(ids)]
    with reg.engine.begin() as conn:
        conn.execute(insert(Device), devices)
        conn.execute(insert(TelemetryRow), telemetry)
        conn.execute(insert(DriftReportRow), drift)
    return reg


async def settle(pilot: Any, rounds: int = 3) -> None:
    """Let the app's workers (refreshes, actions) finish and the screen catch up with what they returned."""
    for _ in range(rounds):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
