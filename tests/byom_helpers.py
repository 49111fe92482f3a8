"""One real server, its managed Mosquitto and one real agent process, for deploying bundles one after another and
asking the agent's local API for answers: the last leg of the "bring your own model" end-to-end tests.

    with deployed_agent(tmp_path, key) as fleet:
        served = fleet.deploy(bundle_dir)       # the ArtifactEntry the device chose and now runs
        answer = fleet.predict(rows)            # POST /v1/predict, the JSON answer
        path = fleet.artifact_file(bundle_dir, served)  # that artifact's file, for ONNX Runtime's own answer
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import Session

from protocol import ArtifactEntry, decode_model
from protocol.signing import SignedManifest
from server.app import ServerApp
from server.db.models import Device
from tests._mosquitto import free_port
from tests.agent_harness import AgentProcess
from tests.server_helpers import server_dir, wait_for
from tests.tls_device_helpers import reachable

__all__ = ["DeployedAgent", "deployed_agent"]

DEVICE = "byom-1"


@dataclass
class DeployedAgent:
    app: ServerApp
    api_port: int
    log: Path

    def deploy(self, bundle: Path, timeout: float = 120.0) -> ArtifactEntry:
        """Push ``bundle`` (signed with the key the fleet was made with), deploy it to the device and wait until the
        agent runs it; returns the artifact the device chose."""
        reg = self.app.registry
        version = reg.push_model(bundle)
        reg.deploy(version.name, version.version, DEVICE)
        manifest = decode_model(SignedManifest, (bundle / "manifest.json").read_bytes()).manifest

        def running() -> str | None:
            if "Traceback" in self.log.read_text(errors="replace"):
                raise AssertionError(f"the agent failed:\n{self.log.read_text(errors='replace')[-4000:]}")
            with Session(reg.engine) as db:
                d = db.get(Device, DEVICE)
                if d and d.running_manifest == version.manifest_sha256 and d.install_step == "done":
                    return d.running_artifact
                return None

        name = wait_for(running, timeout, f"the agent to run {version.name} {version.version}")
        return next(a for a in manifest.artifacts if a.name == name)

    @staticmethod
    def artifact_file(bundle: Path, artifact: ArtifactEntry) -> Path:
        return bundle / "artifacts" / artifact.sha256

    def predict(self, rows: np.ndarray | list[Any]) -> dict[str, Any]:
        """The agent's answer to ``POST /v1/predict`` with ``rows`` as its inputs."""
        inputs = rows.tolist() if isinstance(rows, np.ndarray) else rows
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}/v1/predict",
                                     data=json.dumps({"inputs": inputs}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # loopback, the test's own agent
                answer: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"/v1/predict answered {exc.code}: {exc.read()[:2000]!r}") from None
        return answer


@contextmanager
def deployed_agent(tmp_path: Path, key: Ed25519PrivateKey, profile: str = "x86-64") -> Iterator[DeployedAgent]:
    """A server whose signing key is ``key``, and one enrolled device (``profile``) running the real agent over
    TLS with its local API on a free loopback port."""
    data, _ = server_dir(reachable(tmp_path) / "server", key)
    app = ServerApp(data, metrics_port=0, drift_interval=3600).start()
    agent = None
    try:
        enrolled = app.registry.add_device(DEVICE, profile, ["byom"], custom_profile=True)
        device_dir = shutil.copytree(enrolled.agent_config.parent, tmp_path / "device")
        api_port = free_port()
        log = tmp_path / "agent.log"
        agent = AgentProcess(device_dir / "agent.toml", log, env={
            "EDGEHERD_AGENT_DATA_DIR": str(tmp_path / "agent"), "EDGEHERD_AGENT_API_PORT": str(api_port),
            "EDGEHERD_AGENT_WINDOW_SECONDS": "1"})
        yield DeployedAgent(app, api_port, log)
    finally:
        if agent is not None:
            agent.stop()
        app.stop()
