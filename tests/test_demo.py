"""`edgeherd demo --no-tui`, as `make demo` runs it (with the digits build already made)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server_helpers import server_dir

pytestmark = pytest.mark.integration


def test_the_demo_rolls_out_v1_catches_v2_at_the_canary_and_the_drifting_device(digits_bundle, tmp_path):
    data, _ = server_dir(tmp_path / "demo", digits_bundle.key)
    shutil.copytree(digits_bundle.dir, data / "bundles" / "digits-1.0.0")
    out = subprocess.run([sys.executable, "-m", "server.cli", "demo", "--no-tui", "--data-dir", str(data)],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200",
                         "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:] + "".join(
        f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((data / "logs").glob("*.log")))
    assert "reusing" in text and "signature checked" in text
    assert "v1 on all devices: yes" in text
    assert "v2 rolled back at the canary by the predictions gate" in text
    assert "drift alert on x86-lab ·" in text  # and on nobody else
    assert "TensorRT needs an NVIDIA GPU" in text
