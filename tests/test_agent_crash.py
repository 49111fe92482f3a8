"""kill -9 of the agent process at every install step, then a restart: the device ends on the new
model (the install resumes) and said, while it resumed, that the old one was still serving."""

from __future__ import annotations

import signal

import pytest

from tests.agent_harness import AgentProcess, FakeServer, agent_config, write_agent_toml

pytestmark = pytest.mark.integration

FP32, INT8 = "digits-onnx-fp32", "digits-onnx-int8"
STEPS = ["preflight", "download", "download-mid", "verify", "install", "load", "smoke_test", "switch"]


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_each_install_step_then_restart(mosquitto, digits_bundle, tmp_path, step):
    server = FakeServer(mosquitto, digits_bundle.artifacts)
    password = mosquitto.add_device("pi-1")
    cfg = agent_config(mosquitto, tmp_path / "data", "pi-1", password, digits_bundle.key.public_key())
    config = write_agent_toml(tmp_path / "agent.toml", cfg)
    log = tmp_path / "agent.log"
    first = AgentProcess(config, log, kill_at=f"{step}@{INT8}")
    second = None
    try:
        server.desire("pi-1", 1, digits_bundle.signed, FP32)
        server.wait_running(FP32)
        server.desire("pi-1", 2, digits_bundle.signed, INT8)
        assert first.wait_killed() == -signal.SIGKILL, log.read_text()[-2000:]
        # the broker published the last will
        server.wait(lambda s: s.states and s.states[-1].status == "offline", what="offline")
        killed_at = len(server.seen.states)
        second = AgentProcess(config, log)
        done = server.wait_running(INT8, timeout=90)
        # (a connection of the restarted agent that drops at once shows as its will first: not a report)
        after = [st for st in server.seen.states[killed_at:] if st.status == "online"]
        # on reconnect it reported a working model: the old one with the install in progress, or (the resumed
        # install may finish before the TLS session is up) the new one with the install done
        assert after[0].status == "online" and after[0].running is not None
        assert after[0].running.artifact in (FP32, INT8)
        if step != "switch" and after[0].running.artifact == INT8:
            assert after[0].install is not None and after[0].install.step.value == "done", after[0]
        assert done.install.version == digits_bundle.signed.manifest.version and done.install.error is None
    finally:
        if second is not None:
            second.stop()
        first.stop()
        server.close()
