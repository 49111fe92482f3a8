"""The agent installs with its core dependencies plus ONNX Runtime, and runs, on Python 3.10 and 3.13.

Slow (it builds virtual environments from the package index): run with ``make test-all``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.toolchain_helpers import blobs, logistic_onnx

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys, numpy as np
from pathlib import Path
import agent.runtime, agent.cli
from agent.backends import open_backend
x = np.load(sys.argv[2])
out = open_backend(Path(sys.argv[1]), "onnxruntime").predict(x)
heavy = [m for m in ("torch", "textual", "sqlmodel", "server", "toolchain") if m in sys.modules]
print(int(out.argmax(1).sum()), heavy)
"""


def _python(version: str) -> str | None:
    """A real interpreter (not a pyenv shim) for ``version``."""
    pyenv = Path.home() / ".pyenv" / "versions"
    found = sorted(pyenv.glob(f"{version}.*/bin/python")) if pyenv.exists() else []
    if found:
        return str(found[-1])
    for candidate in (shutil.which(f"python{version}"), f"/usr/bin/python{version}"):
        if candidate and ".pyenv/shims" not in candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.mark.parametrize("version", ["3.10", "3.13"])
def test_agent_on_python(version, tmp_path):
    python = _python(version)
    if python is None:
        pytest.skip(f"no Python {version} interpreter on this machine")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"{ROOT}[onnx]"], check=True, timeout=900, capture_output=True)
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list"], capture_output=True, text=True,
                            check=True).stdout.lower()
    assert "torch" not in listed and "sqlmodel" not in listed and "textual" not in listed
    x, y = blobs(30)
    model = logistic_onnx(tmp_path / "m.onnx", x, y)
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK, str(model), str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 1)[1].strip() == "[]"
    version_out = subprocess.run([str(venv / "bin" / "edgeherd-agent"), "--version"], capture_output=True,
                                 text=True, timeout=60)
    assert version_out.returncode == 0 and version_out.stdout.startswith("edgeherd-agent ")
