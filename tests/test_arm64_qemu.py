"""A Raspberry Pi 5 flashed for real on an x86-64 machine: the agent runs as arm64 code under qemu.

The story is tests/test_tls_flash_e2e.py's with an arm64 root filesystem in place of a temporary directory:

1. a minimal Debian 12 (bookworm) arm64 root filesystem, made by ``debootstrap --arch=arm64`` from Debian's own
   arm64 packages (Python 3.11, the raspberry-pi-5 profile's) and cached between runs;
2. ``edgeherd flash DEV --profile raspberry-pi-5 --rootfs ROOTFS`` against a running ``edgeherd server run``:
   the bundle (aarch64 wheels, LiteRT's among them, the device's certificate) and its first-boot unit go into a
   copy of that root filesystem;
3. the first-boot unit's command (``install.sh --firstboot``) runs inside the root filesystem with ``chroot``:
   Debian's arm64 ``python3.11`` makes the virtual environment and pip installs the arm64 wheels, every arm64
   program executed by ``qemu-aarch64-static`` through the kernel's binfmt_misc registration;
4. the installed agent starts as its unit says (its command, its user) in the same chroot; the chroot shares
   this machine's network namespace, so it reaches the server's broker on loopback over TLS;
5. the digits model is deployed: the device picks the TFLite artifact (the only runtime it reports is LiteRT),
   installs and smoke-tests it, and serves ``POST /v1/predict``; its answers are compared with this machine's
   own LiteRT and ONNX Runtime answers for the same inputs, and its fingerprint says aarch64.

Nothing here is a Raspberry Pi: the CPU is emulated instruction by instruction (qemu user mode, no system
emulation, no Pi kernel or firmware) and there is no systemd running in the chroot. Runs as root (chroot, mount
namespaces); skips with the reason where qemu, debootstrap, binfmt_misc or the network are missing. ``make
test-all`` installs qemu-user-static and debootstrap and registers qemu-aarch64 with binfmt_misc
(``make arm64-deps``). The result, measured, is in docs/hardware.md ("arm64 under emulation").
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from server.broker import free_port
from server.cli import app
from server.db.models import Device
from server.registry import Registry
from tests.api_helpers import stop_server
from tests.conftest import BuiltBundle
from tests.provision_helpers import profile_wheelhouse
from tests.server_helpers import server_dir, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROFILE = "raspberry-pi-5"
DEVICE = "pi5-qemu"
SUITE = "bookworm"  # Debian 12: Python 3.11 and glibc 2.36, as the raspberry-pi-5 profile says
PACKAGES = ["python3", "python3-venv", "systemd", "passwd", "ca-certificates"]
ROOT = Path(__file__).resolve().parents[1]
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
#: Where the debootstrapped root filesystem is kept between runs (debootstrap under emulation takes minutes).
CACHE = Path(os.environ.get("EDGEHERD_ARM64_CACHE") or Path.home() / ".cache/edgeherd/arm64-rootfs")


def _mirror() -> str:
    """The Debian mirror: $EDGEHERD_DEBIAN_MIRROR, else the one apt on this machine uses, else deb.debian.org."""
    if os.environ.get("EDGEHERD_DEBIAN_MIRROR"):
        return os.environ["EDGEHERD_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for src in sources:
        text = src.read_text(errors="replace") if src.is_file() else ""
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(r"^deb\s+(?:\[[^]]*]\s+)?(\S+/debian)\s",
                                                                            text, re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def _cached() -> bool:
    return (CACHE / ".edgeherd-complete").exists()


def _why_not() -> str | None:
    """Why the arm64 run cannot happen on this machine, or None."""
    if sys.platform != "linux":
        return "needs Linux (chroot, binfmt_misc)"
    if os.geteuid() != 0:
        return "needs root: chroot into the arm64 root filesystem and a private mount namespace for its /proc"
    for tool in ("chroot", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux / coreutils)"
    if platform.machine() != "aarch64":
        if shutil.which("qemu-aarch64-static") is None:
            return "qemu-aarch64-static is not installed: apt-get install qemu-user-static (or: make arm64-deps)"
        if not BINFMT.exists() or not BINFMT.read_text().startswith("enabled"):
            return ("qemu-aarch64 is not registered with binfmt_misc (/proc/sys/fs/binfmt_misc/qemu-aarch64): "
                    "as root, run make arm64-deps (or update-binfmts --enable qemu-aarch64)")
        if "F" not in (re.search(r"^flags: (\S*)", BINFMT.read_text(), re.M) or ["", ""])[1]:
            return "qemu-aarch64's binfmt_misc entry lacks the F flag, so it cannot run inside a chroot"
    if not _cached():
        if shutil.which("debootstrap") is None:
            return f"no cached rootfs at {CACHE} and debootstrap is not installed: apt-get install debootstrap"
        try:
            urllib.request.urlopen(f"{_mirror()}/dists/{SUITE}/Release", timeout=10).close()
        except (urllib.error.URLError, OSError) as exc:
            return f"no cached rootfs at {CACHE} and the Debian mirror {_mirror()} is unreachable ({exc})"
    return None


def _debootstrap() -> None:
    """Make the cached Debian arm64 root filesystem (once; later runs copy it)."""
    if _cached():
        return
    partial = CACHE.with_name(CACHE.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                           SUITE, str(partial), _mirror()], capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for deb in (partial / "var/cache/apt/archives").glob("*.deb"):  # the downloaded packages: 130 files, 50 MB
        deb.unlink()
    (partial / ".edgeherd-complete").write_text(f"debootstrap {SUITE} arm64 {','.join(PACKAGES)} {_mirror()}\n")
    shutil.rmtree(CACHE, ignore_errors=True)
    partial.rename(CACHE)


def _in_rootfs(rootfs: Path, argv: list[str], env: dict[str, str], user: str | None = None) -> list[str]:
    """``argv`` run inside ``rootfs`` as a service would: chroot, a fresh /proc and the host's /dev in a mount
    namespace of its own (gone with the process, so nothing stays mounted), a clean environment."""
    userspec = [f"--userspec={user}:{user}"] if user else []
    envs = [f"{k}={v}" for k, v in env.items()]
    script = ('mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && r=$1 && shift && '
              'exec chroot "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(rootfs),
            *userspec, str(rootfs), "/usr/bin/env", "-i", *envs, *argv]


def _output_step(model: Path) -> float:
    """The quantisation step of a TFLite model's int8 output (0.0 when its output is float)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model))
    scale, _ = interpreter.get_output_details()[0]["quantization"]
    return float(scale)


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, (args, result.output)
    return " ".join(result.output.split())


def _server_run(data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "server.cli", "server", "run", "--data-dir", str(data),
                                 "--public-host", "localhost", "--listen", f"127.0.0.1:{port}", "--metrics-port",
                                 "0", "--drift-interval", "0", "--rollout-interval", "0.3"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        out: dict[str, object] = json.loads(resp.read())
    return out


@pytest.mark.timeout(5400)  # debootstrap (first run only), the wheelhouse's download and the emulated install
@pytest.mark.skipif((why := _why_not()) is not None, reason=f"arm64 under qemu: {why}")
def test_flash_a_debian_arm64_rootfs_install_and_serve_under_qemu(
        digits_bundle: BuiltBundle, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from agent.backends import open_backend
    from toolchain.data import load_digits

    timings: dict[str, float] = {}
    t = time.monotonic()
    _debootstrap()
    timings["debootstrap (0 when cached)"] = time.monotonic() - t
    t = time.monotonic()
    wheels, _ = profile_wheelhouse(tmp_path_factory, PROFILE)
    timings["aarch64 wheelhouse download"] = time.monotonic() - t

    t = time.monotonic()
    rootfs = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", "--reflink=auto", str(CACHE), str(rootfs)], check=True, timeout=600)
    (rootfs / ".edgeherd-complete").unlink()
    hosts = rootfs / "etc/hosts"
    if "localhost" not in (hosts.read_text() if hosts.exists() else ""):  # as every image has
        hosts.write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    arch = subprocess.run(_in_rootfs(rootfs, ["/usr/bin/python3", "-c",
                                              "import platform, sys; print(platform.machine(), sys.version)"],
                                     {"PATH": "/usr/bin:/bin"}), capture_output=True, text=True, timeout=300)
    assert arch.returncode == 0, arch.stderr
    assert arch.stdout.startswith("aarch64 3.11."), arch.stdout
    timings["copy rootfs, first arm64 python"] = time.monotonic() - t

    os.chmod(tmp_path, 0o711)  # noqa: S103 - the broker runs as its own user and must reach the data directory
    data, _ = server_dir(tmp_path / "server", digits_bundle.key)
    port = free_port()
    server_log, agent_log = tmp_path / "server.log", tmp_path / "agent.log"
    server = _server_run(data, port, server_log)
    agent: subprocess.Popen[bytes] | None = None
    try:
        url = f"mqtts://localhost:{port}"
        wait_for(lambda: f"server running; broker {url} (devices)" in server_log.read_text() or server.poll(), 60,
                 "the server to start")
        assert server.poll() is None, server_log.read_text()

        # flash into the root filesystem: its facts (aarch64, Debian 12, Python 3.11) are checked against the profile
        t = time.monotonic()
        said = cli("flash", DEVICE, "--profile", PROFILE, "--rootfs", str(rootfs), "--data-dir", str(data),
                   "--find-links", str(wheels), "--no-index")
        assert f"enrolled {DEVICE}" in said, said
        unit = (rootfs / "etc/systemd/system/edgeherd-firstboot.service").read_text()
        firstboot = shlex.split(next(x for x in unit.splitlines() if x.startswith("ExecStart="))[10:])
        timings["flash --rootfs"] = time.monotonic() - t

        # the first boot's installer, arm64, in the chroot (no systemd runs there to start the agent)
        t = time.monotonic()
        installed = subprocess.run(_in_rootfs(rootfs, firstboot, {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "EDGEHERD_INSTALL_NO_SYSTEMD": "1",
            "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}),
            capture_output=True, text=True, timeout=2400)
        assert installed.returncode == 0, installed.stdout[-6000:] + installed.stderr[-6000:]
        assert f"installed the certificate, key and pinned CA of {DEVICE}" in installed.stdout
        assert not (rootfs / "etc/systemd/system/multi-user.target.wants/edgeherd-firstboot.service").exists()
        venv = rootfs / "opt/edgeherd/venv"
        litert = list(venv.resolve().glob("lib/python3.11/site-packages/ai_edge_litert*/**/*.so"))
        assert litert, "no LiteRT shared library in the device's virtual environment"
        elf = litert[0].read_bytes()[:20]
        assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183  # EM_AARCH64
        timings["install.sh --firstboot (emulated)"] = time.monotonic() - t

        # the agent, as its unit says: its command line, its user, the chroot for its root
        t = time.monotonic()
        agent_unit = (rootfs / "etc/systemd/system/edgeherd-agent.service").read_text()
        exec_start = shlex.split(next(x for x in agent_unit.splitlines() if x.startswith("ExecStart="))[10:])
        user = next(x for x in agent_unit.splitlines() if x.startswith("User="))[5:]
        api_port = free_port()
        with agent_log.open("ab") as out:
            agent = subprocess.Popen(_in_rootfs(rootfs, exec_start, {
                "PATH": "/usr/bin:/bin", "EDGEHERD_AGENT_API_PORT": str(api_port)}, user), stdout=out, stderr=out)
        registry = Registry(data)

        def device() -> Device | None:
            with Session(registry.engine) as db:
                return db.get(Device, DEVICE)

        wait_for(lambda: ((d := device()) is not None and d.status == "online" and d.fingerprint)
                 or agent.poll() is not None, 600, "the arm64 agent to connect")
        assert agent.poll() is None, agent_log.read_text()[-6000:]
        online = device()
        assert online is not None and online.fingerprint is not None
        assert online.fingerprint["arch"] == "aarch64", online.fingerprint
        timings["agent start to online (emulated)"] = time.monotonic() - t

        # the model: the device takes the TFLite artifact, installs and smoke-tests it under emulation, serves it
        t = time.monotonic()
        cli("model", "push", str(digits_bundle.dir), "--data-dir", str(data))
        cli("deploy", "digits:1.0.0", "--device", DEVICE, "--data-dir", str(data))
        done = wait_for(lambda: (d := device()) and (d.install_step == "done" and d.running_artifact and d), 900,
                        "the arm64 agent to install the model")
        timings["deploy to installed (emulated)"] = time.monotonic() - t
        manifest = digits_bundle.signed.manifest
        entry = next(a for a in manifest.artifacts if a.name == done.running_artifact)
        assert entry.runtime.name == "ai-edge-litert", (entry.name, entry.runtime)

        x = load_digits().x[:32].astype(np.float32)
        t = time.monotonic()
        answer = _post(f"http://127.0.0.1:{api_port}/v1/predict", {"inputs": x.tolist()})
        timings["predict 32 rows (emulated)"] = time.monotonic() - t
        assert answer["model"] == "digits"
        device_out = np.asarray(answer["outputs"], dtype=np.float32)
        host = open_backend(digits_bundle.artifacts / entry.sha256, entry.runtime.name)
        host_out = np.asarray(host.predict(x), dtype=np.float32).reshape(device_out.shape)
        onnx = next(a for a in manifest.artifacts if a.runtime.name == "onnxruntime" and a.precision == "fp32")
        onnx_out = np.asarray(open_backend(digits_bundle.artifacts / onnx.sha256, "onnxruntime").predict(x))
        diff = float(np.abs(device_out - host_out).max())
        step = _output_step(digits_bundle.artifacts / entry.sha256)
        steps_off = int(np.count_nonzero(np.abs(device_out - host_out) > 1e-6))
        same_as_host = float((device_out.argmax(1) == host_out.argmax(1)).mean())
        same_as_onnx = float((device_out.argmax(1) == onnx_out.reshape(len(x), -1).argmax(1)).mean())
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v1/health", timeout=60) as resp:
            health = json.loads(resp.read())
        assert health["status"] == "ok" and health["connected"] is True
        print(f"\narm64 under qemu: {entry.name} ({entry.precision.value}); max |device - host LiteRT| = {diff:.3g} "
              f"(output step {step:.3g}; {steps_off} of {device_out.size} values differ); top-1 agreement with "
              f"host LiteRT {same_as_host:.0%}, with host ONNX fp32 {same_as_onnx:.0%}")
        print("timings: " + "; ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        print(f"rootfs: {(CACHE / '.edgeherd-complete').read_text().strip()}; device python {arch.stdout.strip()}")
        qemu = (subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True, text=True).stdout
                if shutil.which("qemu-aarch64-static") else "native aarch64\n")
        dists = sorted(d.name.removesuffix(".dist-info") for d in venv.resolve().glob("lib/python3.11/site-packages/"
                                                                                      "*.dist-info"))
        print(f"emulator: {qemu.splitlines()[0]}; device venv: {', '.join(dists)}")
        # LiteRT's arm64 kernels (on the device) and x86-64 ones (here) may round an int8 output differently, by
        # one quantisation step at most; an fp32 output agrees to float rounding. The answers are the same.
        assert same_as_host == 1.0, (same_as_host, device_out.argmax(1), host_out.argmax(1))
        assert diff <= max(step * 1.001, 1e-4), (diff, step)
        assert same_as_onnx >= 0.9, same_as_onnx
    finally:
        if agent is not None:
            stop_server(agent)
        stop_server(server)
