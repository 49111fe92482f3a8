"""The end-to-end demo's wall time, against building its model alone, in the same run.

Baseline: ``edgeherd build digits`` (train, quantize, convert, sign) into a fresh directory. Then
``edgeherd demo --no-tui`` from scratch in another one (it builds the same model again, then runs the
server, six agents, two rollouts and the drift injection). Prints both and their ratio; the demo must
succeed (exit 0).

Run: ``python -m benchmarks.demo_time``
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cli = [sys.executable, "-m", "server.cli"]
        subprocess.run([*cli, "keys", "generate", "--out", str(root / "keys")], check=True,
                       capture_output=True)
        t0 = time.monotonic()
        subprocess.run([*cli, "build", "digits", "--out", str(root / "digits"), "--key",
                        str(root / "keys" / "signing.key")], check=True, capture_output=True)
        build = time.monotonic() - t0
        t0 = time.monotonic()
        demo = subprocess.run([*cli, "demo", "--no-tui", "--data-dir", str(root / "demo")],
                              capture_output=True, text=True)
        total = time.monotonic() - t0
    summary = next((line for line in demo.stdout.splitlines() if line.startswith("v1 on all devices")), "")
    print(f"build digits alone: {build:.0f} s; whole demo from scratch: {total:.0f} s "
          f"= {total / build:.1f} × the build; exit {demo.returncode}")
    print(summary or demo.stdout[-2000:])
    raise SystemExit(demo.returncode)


if __name__ == "__main__":
    main()
