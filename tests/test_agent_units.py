"""Pure parts of the agent: window statistics, the install table, downloads, pre-flight, config."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from agent.config import AgentConfig, load_config
from agent.download import Download
from agent.errors import ConfigError
from agent.install import TRANSITIONS, Event, InstallRecord, Step, TransitionError, next_step
from agent.preflight import check, version_tuple
from agent.stats import bin_counts
from agent.window import WindowStats, feature_rows
from protocol import Chunk, FeatureReference, ReferenceProfile
from tests.samples import manifest

T0 = datetime(2026, 11, 28, tzinfo=timezone.utc)


def _profile():
    feats = [FeatureReference(name=f"f{j}", edges=[-2.0, -1.0, 0.0, 1.0, 2.0][: 3 + j % 3], counts=[1] * (2 + j % 3),
                              mean=0.0, std=1.0) for j in range(6)]
    return ReferenceProfile(kind="raw", n=10, features=feats, confidence_edges=[0.0, 0.5, 1.0],
                            confidence_counts=[5, 5])


def test_window_counts_match_per_feature_binning_and_moments_match_numpy():
    ref = _profile()
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1.5, size=(500, 6)).astype(np.float32)
    x[::17, 2] = np.nan
    x[::29, 4] = np.inf
    out = rng.normal(size=(500, 3)).astype(np.float32)
    w = WindowStats(ref, 3)
    for i in range(0, 500, 64):  # in uneven batches, as the predictor feeds it
        w.add_rows(x[i : i + 64], out[i : i + 64])
    _, stats = w.close(device_id="d", session=1, window_seq=0, start=T0, end=T0, manifest_sha256="a" * 64)
    assert stats is not None and stats.n == 500
    for j, (f, got) in enumerate(zip(ref.features, stats.features, strict=True)):
        want = bin_counts(x[:, j].astype(np.float64), np.asarray(f.edges))
        assert got.counts == want.counts.tolist() and (got.below, got.above, got.nan) == (
            want.below, want.above, want.nan)
        finite = x[:, j][np.isfinite(x[:, j])].astype(np.float64)
        assert got.mean == pytest.approx(finite.mean(), rel=1e-9)
        assert got.m2 == pytest.approx(((finite - finite.mean()) ** 2).sum(), rel=1e-6)
        assert (got.min, got.max) == (pytest.approx(finite.min()), pytest.approx(finite.max()))
    assert stats.class_counts == np.bincount(out.argmax(1), minlength=3).tolist()
    assert sum(stats.confidence_counts) == 500


def test_window_latency_summary_and_reset():
    w = WindowStats(None, 2)
    for ms in [0.3] * 90 + [30.0] * 10:
        w.record_request(ms)
    w.record_request(1.0, error=True)
    telemetry, stats = w.close(device_id="d", session=1, window_seq=3, start=T0, end=T0, manifest_sha256=None)
    assert stats is None and telemetry.requests == 101 and telemetry.errors == 1
    assert 0.2 <= telemetry.latency_ms.p50 <= 0.5 and 20 <= telemetry.latency_ms.p95 <= 50
    assert telemetry.latency_ms.max == 30.0 and sum(telemetry.latency_counts) == 101
    again, _ = w.close(device_id="d", session=1, window_seq=4, start=T0, end=T0, manifest_sha256=None)
    assert again.requests == 0 and again.latency_ms is None
    assert w.lifetime_requests == 101


def test_image_rows_use_the_shared_summaries():
    x = np.random.default_rng(1).random((4, 3, 5, 5))
    assert feature_rows(x, "image").shape == (4, 15)
    assert feature_rows(x, "raw").shape == (4, 75)


def test_install_table_walks_the_pipeline_and_refuses_nonsense():
    step, seen = Step.IDLE, []
    step = next_step(step, Event.START)
    while step is not Step.DONE:
        seen.append(step)
        step = next_step(step, Event.OK)
    assert seen == [Step.PREFLIGHT, Step.DOWNLOAD, Step.VERIFY, Step.INSTALL, Step.LOAD, Step.SMOKE_TEST, Step.SWITCH]
    for s in seen:
        assert next_step(s, Event.FAIL) is Step.FAILED
    assert next_step(Step.VERIFY, Event.RETRY) is Step.DOWNLOAD
    for bad in [(Step.IDLE, Event.OK), (Step.DONE, Event.OK), (Step.DOWNLOAD, Event.RETRY), (Step.FAILED, Event.FAIL)]:
        assert bad not in TRANSITIONS
        with pytest.raises(TransitionError):
            next_step(*bad)


def test_install_record_round_trips_and_tolerates_garbage(tmp_path):
    rec = InstallRecord(step=Step.LOAD, generation=4, manifest_sha256="a" * 64, model="m", version="1",
                        artifact="x", slot="b", attempts=1)
    rec.save(tmp_path / "r.json")
    assert InstallRecord.load(tmp_path / "r.json") == rec
    (tmp_path / "r.json").write_text("{not json")
    assert InstallRecord.load(tmp_path / "r.json") == InstallRecord()


def test_download_tracks_ranges_rejects_strangers_and_resumes(tmp_path):
    data = bytes(range(256)) * 1000  # 256000 bytes: 4 chunks of 64 KiB
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    dl = Download(tmp_path, sha, len(data), 65536)
    assert dl.missing_ranges(set(), 5) == [(0, len(data))]
    assert not dl.accept(Chunk("a" * 32, "b" * 64, 0, len(data), data[:65536]))  # other artifact
    assert not dl.accept(Chunk("a" * 32, sha, 100, len(data), data[100:200]))  # misaligned
    assert dl.accept(Chunk("a" * 32, sha, 65536, len(data), data[65536:131072]))
    assert not dl.accept(Chunk("a" * 32, sha, 65536, len(data), data[65536:131072]))  # already held
    assert dl.missing_ranges(set(), 5) == [(0, 65536), (131072, len(data) - 131072)]
    # a request in flight covers its chunks, however much of it has arrived: nothing of it is asked for again
    assert dl.missing_ranges({(0, len(data))}, 5) == []
    assert dl.missing_ranges({(131072, 65536)}, 5) == [(0, 65536), (196608, len(data) - 196608)]
    dl.persist()
    dl.close()
    again = Download(tmp_path, sha, len(data), 65536)  # after a restart
    assert again.have == {1} and again.received == 65536
    for off in (0, 131072, 196608):
        again.accept(Chunk("a" * 32, sha, off, len(data), data[off : off + 65536]))
    assert again.complete and again.verify()
    again.remove()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("v", "t"), [("1.18.0", (1, 18, 0)), ("2.3.0rc1", (2, 3, 0)), ("10.3.0.26", (10, 3, 0, 26)),
                                      ("1.32.0+cpu", (1, 32, 0))])
def test_version_tuple(v, t):
    assert version_tuple(v) == t


def test_preflight_names_what_is_missing(tmp_path):
    art = manifest().artifacts[0]  # onnxruntime >= 1.18.0
    assert check(art, tmp_path, {"onnxruntime": "1.32.0"}) is None
    assert "which is not installed (installed: ai-edge-litert 2.3.0)" in check(art, tmp_path,
                                                                              {"ai-edge-litert": "2.3.0"})
    assert "this device has 1.16.3" in check(art, tmp_path, {"onnxruntime": "1.16.3"})
    ok = {"onnxruntime": "1.32.0"}
    assert "not enough disk" in check(art, tmp_path, ok, disk_free=art.size, memory=10**9)
    assert "not enough memory" in check(art, tmp_path, ok, disk_free=10**9, memory=art.size)


def test_config_errors_name_the_key(tmp_path, monkeypatch):
    good = {"device_id": "pi-1", "broker_url": "mqtt://localhost:1883", "server_key": "ed25519:x", "data_dir": "/tmp"}
    assert AgentConfig(**good).broker_port == 1883
    assert AgentConfig(**{**good, "broker_url": "mqtts://b.example"}).broker_port == 8883
    for key, value, fragment in [("device_id", "Pi/1", "device_id"), ("broker_url", "http://x", "broker_url"),
                                 ("api_port", 70000, "api_port"), ("colour", "red", "colour")]:
        path = tmp_path / "a.toml"
        body = {**good, key: value}
        path.write_text("\n".join(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
                                  for k, v in body.items()))
        with pytest.raises(ConfigError, match=fragment):
            load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    path = tmp_path / "ok.toml"
    path.write_text("\n".join(f'{k} = "{v}"' for k, v in good.items()))
    monkeypatch.setenv("EDGEHERD_AGENT_API_PORT", "9999")
    assert load_config(path).api_port == 9999
