"""hardware.detect() on recorded file samples of every board (tests/data/hardware/), and on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from hardware import detect
from hardware.detection import read_facts, satisfies
from hardware.profiles import load_all

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).parent / "data" / "hardware"


@pytest.mark.parametrize("name", sorted(load_all()))
def test_every_profile_is_detected_from_its_board_sample(name):
    found = detect(SAMPLES / name)
    assert found.profile == name, found
    assert found.problems == () and found.ok, found.problems


@pytest.mark.parametrize(("sample", "facts"), [
    ("jetson-orin-nano", {"board": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit", "l4t": "R36.4.0",
                          "arch": "aarch64", "cores": 6, "os_id": "ubuntu", "os_version": "22.04",
                          "python": "3.10", "runtimes": {"tensorrt": "10.3.0"}}),
    ("jetson-xavier-nx", {"l4t": "R35.4.1", "python": "3.8", "pythons": ("3.8", "3.10"), "cores": 6,
                          "runtimes": {"tensorrt": "8.5.2.2"}}),
    ("raspberry-pi-5", {"board": "Raspberry Pi 5 Model B Rev 1.0", "arch": "aarch64", "kernel_arch": "aarch64",
                        "cores": 4, "memory_bytes": 8245344 * 1024, "os_id": "debian", "os_version": "12",
                        "python": "3.11", "gpu": None, "l4t": None}),
    ("x86-64-nvidia", {"arch": "x86_64", "board": None, "cores": 16, "cpu_model": "Intel(R) Xeon(R) w5-2455X",
                       "runtimes": {"tensorrt": "10.7.0"}}),
])
def test_facts_are_read_from_the_files(sample, facts):
    got = read_facts(SAMPLES / sample)
    for key, want in facts.items():
        assert getattr(got, key) == want, key


def test_gpus():
    jetson = read_facts(SAMPLES / "jetson-agx-orin").gpu
    assert jetson is not None and (jetson.kind, jetson.driver) == ("tegra", "R36.4.0")
    card = read_facts(SAMPLES / "x86-64-nvidia").gpu
    assert card is not None and (card.kind, card.name, card.driver) == ("discrete", "NVIDIA GeForce RTX 4090",
                                                                         "550.127.05")
    bare = read_facts(SAMPLES / "x86-64-nvidia-no-driver").gpu
    assert bare is not None and bare.kind == "discrete" and bare.driver is None  # seen on the PCI bus only
    assert read_facts(SAMPLES / "x86-64-cpu").gpu is None  # an Intel display controller is not an NVIDIA GPU


@pytest.mark.parametrize(("sample", "profile", "problems"), [
    # an Orin Nano still on JetPack 5: the board is known, its software is not what the profile needs
    ("jetson-orin-nano-jetpack5", "jetson-orin-nano",
     ["the OS is Ubuntu 20.04", "Jetson Linux is R35.4.1 (JetPack 5); jetson-orin-nano is for R36 (JetPack 6)",
      "Python 3.10 (python3) is not installed (found 3.8)", "tensorrt is 8.5.2.2; jetson-orin-nano needs >=10.0,<11"]),
    # a Pi 5 with the 32-bit image: 64-bit kernel, armhf userland
    ("raspberry-pi-5-32bit", "raspberry-pi-5", ["the userland is armv7l; raspberry-pi-5 needs a aarch64 (64-bit)"]),
    ("x86-64-nvidia-no-driver", "x86-64-nvidia", ["an NVIDIA GPU is present but its driver is not loaded"]),
    ("unknown-arm-board", None, []),
])
def test_boards_that_differ_from_their_profile_say_how(sample, profile, problems):
    found = detect(SAMPLES / sample)
    assert found.profile == profile and not found.ok
    assert len(found.problems) == len(problems), found.problems
    for got, want in zip(found.problems, problems, strict=True):
        assert got.startswith(want), (got, want)
    if profile is None:
        assert found.why == "board 'Radxa ROCK 5B' is not one of the profiles' boards"


def test_memory_and_cores_outside_the_profile(tmp_path):
    import shutil

    shutil.copytree(SAMPLES / "raspberry-pi-zero-2w", tmp_path / "root", symlinks=True)
    (tmp_path / "root/proc/meminfo").write_text("MemTotal:        3885832 kB\n")
    (tmp_path / "root/sys/devices/system/cpu/online").write_text("0-1\n")
    found = detect(tmp_path / "root")
    assert found.profile == "raspberry-pi-zero-2w"
    assert found.problems == ("3795 MiB of memory; raspberry-pi-zero-2w boards have 512–512 MiB",
                              "2 CPU cores; raspberry-pi-zero-2w boards have 4")


def test_symbolic_links_stay_inside_the_root(tmp_path):
    """An image's absolute links (lib64 -> /usr/lib64) resolve inside the image, never on this machine."""
    root = tmp_path / "img"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    (root / "usr/lib").mkdir(parents=True)
    os.symlink("/usr/lib", root / "lib")       # absolute: must mean <root>/usr/lib
    os.symlink("/usr/lib64", root / "lib64")   # absolute, and <root>/usr/lib64 does not exist
    (root / "usr/lib/ld-linux-aarch64.so.1").write_text("")
    os.symlink("/../../../../etc/os-release", root / "escape")
    facts = read_facts(root)
    assert facts.arch == "aarch64"  # this machine's /usr/lib64/ld-linux-x86-64.so.2 was not seen
    from hardware.detection import _Root

    assert _Root(root).read("escape") == 'ID=debian\nVERSION_ID="12"'


@pytest.mark.parametrize(("have", "spec", "ok"), [
    ("10.3.0", ">=10.0,<11", True), ("11.0", ">=10.0,<11", False), ("8.6.2", ">=10.0,<11", False),
    ("10.3.0", "10.3", True), ("10.4", "10.3", False), ("10.3", "==10.3.0", True), ("10.3.1", "==10.3.*", True),
    ("1.32.0", ">=1.18", True), ("1.17.3", ">=1.18", False), ("2.3.0", "~=2.1", True), ("3.0", "~=2.1", False),
    ("1.0", "!=1.0", False), ("1.0", "garbage", False),
])
def test_version_specifiers(have, spec, ok):
    assert satisfies(have, spec) is ok


def test_this_machine():
    """Live detection reads the real files and the installed runtimes' metadata."""
    found = detect()
    facts = found.facts
    assert facts.arch == os.uname().machine and facts.cores == os.cpu_count()
    assert facts.memory_bytes and facts.memory_bytes > 0
    assert facts.runtimes.get("onnxruntime") == version("onnxruntime")
    if facts.arch == "x86_64":
        assert found.profile in ("x86-64-cpu", "x86-64-nvidia")


def test_detection_imports_no_runtime():
    code = ("import sys, hardware; d = hardware.detect(); "
            "print(d.profile, sorted(m for m in ('onnxruntime', 'ai_edge_litert', 'tensorrt', 'numpy', 'paho') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("[]"), out.stdout
