"""Hardware profiles: every supported device has one, each loads and validates, the values the server will use
(latency budget, artifact order) are there, and a malformed file fails naming the file and the key."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from hardware import profiles
from hardware.profiles import PROFILE_DIR, Profile, ProfileError, UnknownProfile, load, load_all, load_file
from protocol import ArtifactEntry, Precision, RuntimeRequirement, ShapeRange, Target, TensorRTBuild, TensorSpec

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    # name: (architecture, python, accelerator, first artifact)
    "jetson-orin-nano": ("aarch64", "3.10", "nvidia-tegra", "tensorrt-int8"),
    "jetson-orin-nx": ("aarch64", "3.10", "nvidia-tegra", "tensorrt-int8"),
    "jetson-agx-orin": ("aarch64", "3.10", "nvidia-tegra", "tensorrt-int8"),
    "jetson-xavier-nx": ("aarch64", "3.10", "nvidia-tegra", "onnx-int8"),
    "raspberry-pi-5": ("aarch64", "3.11", "none", "tflite-int8"),
    "raspberry-pi-4": ("aarch64", "3.11", "none", "tflite-int8"),
    "raspberry-pi-zero-2w": ("aarch64", "3.11", "none", "tflite-int8"),
    "x86-64-cpu": ("x86_64", "3.11", "none", "onnx-int8"),
    "x86-64-nvidia": ("x86_64", "3.10", "nvidia-gpu", "tensorrt-fp16"),
}


def test_every_supported_device_has_a_profile():
    loaded = load_all()
    assert set(loaded) == set(EXPECTED)
    for name, (arch, python, accel, first) in EXPECTED.items():
        p = loaded[name]
        assert (p.system.architecture, p.system.python, p.hardware.accelerator, str(p.artifact_order[0])) == (
            arch, python, accel, first), name
        assert p.latency_budget_ms > 0 and p.system.service_manager == "systemd"


def test_jetpack_6_profiles_pin_what_jetpack_6_ships():
    for name in ("jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin"):
        p = load(name)
        assert (p.system.os_id, p.system.os_version, p.system.l4t) == ("ubuntu", "22.04", "R36")
        assert p.hardware.compute_capability == "8.7"
        trt = next(r for r in p.runtimes if r.name == "tensorrt")
        assert trt.source == "system" and trt.version.startswith(">=10") and p.install.system_site_packages


def test_xavier_nx_says_what_it_does_about_python_3_8():
    p = load("jetson-xavier-nx")
    assert p.supported and p.system.system_python == "3.8" and p.system.python == "3.10"
    assert p.system.python_command == "python3.10" and "python3.10-venv" in p.system.packages
    assert "Python 3.8" in p.notes and "alongside" in p.notes and "CPU" in p.notes
    assert [r.name for r in p.runtimes] == ["onnxruntime"]  # TensorRT 8.5's bindings are for 3.8 only


def test_raspberry_pis_run_litert_on_bookworm():
    for name in ("raspberry-pi-5", "raspberry-pi-4", "raspberry-pi-zero-2w"):
        p = load(name)
        assert (p.system.os_id, p.system.os_version, p.system.glibc) == ("debian", "12", "2.36")
        assert p.install.extra == "tflite" and [r.name for r in p.runtimes] == ["ai-edge-litert"]


def _artifact(name: str, target: Target, precision: Precision, runtime: str) -> ArtifactEntry:
    trt = None
    if target is Target.TENSORRT:
        trt = TensorRTBuild(precision=precision, workspace_bytes=1 << 20, compute_capabilities=["8.7"],
                            min_tensorrt="10.0", profiles=[ShapeRange(input="x", min=[1, 1], opt=[1, 1], max=[8, 1])])
    return ArtifactEntry(name=name, target=target, precision=precision, sha256="0" * 64, size=1,
                         runtime=RuntimeRequirement(name=runtime, min_version="1.0"),  # type: ignore[arg-type]
                         inputs=[TensorSpec(name="x", shape=[-1, 1], dtype="float32")],
                         outputs=[TensorSpec(name="y", shape=[-1, 1], dtype="float32")], tensorrt=trt)


@pytest.mark.parametrize(("profile", "expected"), [
    ("raspberry-pi-5", "m-tflite-int8"),
    ("x86-64-cpu", "m-onnx-int8"),
    ("jetson-orin-nano", "m-tensorrt-int8"),
    ("x86-64-nvidia", "m-tensorrt-fp16"),
    ("jetson-xavier-nx", "m-onnx-int8"),
])
def test_choose_artifact_follows_the_profile_order(profile, expected):
    arts = [_artifact("m-onnx-fp32", Target.ONNX, Precision.FP32, "onnxruntime"),
            _artifact("m-onnx-int8", Target.ONNX, Precision.INT8, "onnxruntime"),
            _artifact("m-tflite-int8", Target.TFLITE, Precision.INT8, "ai-edge-litert"),
            _artifact("m-tensorrt-fp16", Target.TENSORRT, Precision.FP16, "tensorrt"),
            _artifact("m-tensorrt-int8", Target.TENSORRT, Precision.INT8, "tensorrt")]
    chosen = load(profile).choose_artifact(arts)
    assert chosen is not None and chosen.name == expected
    assert load("raspberry-pi-5").choose_artifact(arts[:2]) is None  # no runtime for ONNX on the Pi


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(UnknownProfile, match="no hardware profile 'raspberry-pi-6'; profiles: jetson-agx-orin"):
        load("raspberry-pi-6")
    with pytest.raises(UnknownProfile, match="not a profile name"):
        load("../etc/passwd")


@pytest.mark.parametrize(("name", "custom", "refusal"), [
    ("raspberry-pi-5", False, None),
    ("banana-board", True, None),
    ("simulated", True, None),
    ("banana-board", False, "no hardware profile 'banana-board'; profiles: jetson-agx-orin, jetson-orin-nano, "
                            "jetson-orin-nx, jetson-xavier-nx, raspberry-pi-4, raspberry-pi-5, raspberry-pi-zero-2w, "
                            "x86-64-cpu, x86-64-nvidia; for hardware without a profile, mark the name as a custom "
                            "profile"),
    ("raspberry-pi-5", True, "raspberry-pi-5 is a hardware profile, not a custom one"),
    ("Banana_Board", True, "'Banana_Board' is not a profile name"),
    ("banana\n", True, "is not a profile name"),  # it goes into the agent's TOML config
    ("", True, "is not a profile name"),
    ("b" * 65, True, "is not a profile name"),
])
def test_which_profile_names_a_device_may_be_enrolled_with(name, custom, refusal):
    if refusal is None:
        profiles.check_device_profile(name, custom=custom)
        assert profiles.label(name) == (f"{name} (custom)" if custom else name)
        assert profiles.is_known(name) is not custom
        return
    with pytest.raises(ProfileError) as info:
        profiles.check_device_profile(name, custom=custom)
    assert str(info.value).startswith(refusal) or refusal in str(info.value)


BROKEN = [
    # (what is done to raspberry-pi-5.toml, the key the error must name, a part of its message)
    ("top-level key", lambda t: t.replace('title = "Raspberry Pi 5"', 'title = "Raspberry Pi 5"\ncolour = "red"'),
     "colour", "Extra inputs are not permitted"),
    ("key in a section", lambda t: t.replace("cores = [4]", "cores = [4]\nclock_mhz = 2400"),
     "hardware.clock_mhz", "Extra inputs are not permitted"),
    ("architecture", lambda t: t.replace('architecture = "aarch64"', 'architecture = "arm64"'),
     "system.architecture", "'aarch64' or 'x86_64'"),
    ("python too old", lambda t: t.replace('python = "3.11"', 'python = "3.8"'),
     "system.python", "needs Python 3.10 or newer"),
    ("memory range", lambda t: t.replace("memory_mib = [2048, 16384]", "memory_mib = [16384, 2048]"),
     "hardware.memory_mib", "smallest, largest"),
    ("artifact name", lambda t: t.replace('"tflite-fp32"]', '"tflite-fp64"]'),
     "rollout.artifacts", "not <target>-<precision>"),
    ("artifact without runtime", lambda t: t.replace('"tflite-fp32"]', '"tflite-fp32", "onnx-int8"]'),
     "(file)", "rollout.artifacts: onnx-int8 needs one of onnxruntime in runtimes"),
    ("runtime name", lambda t: t.replace('name = "ai-edge-litert"', 'name = "litert"'),
     "runtimes[1].name", "Input should be"),
    ("latency budget", lambda t: t.replace("latency_budget_ms = 50", "latency_budget_ms = -5"),
     "rollout.latency_budget_ms", "greater than 0"),
    ("missing section", lambda t: re.sub(r"\[rollout\]\n(?:.+\n)+\n", "", t), "rollout", "Field required"),
    ("service manager", lambda t: t.replace('service_manager = "systemd"', 'service_manager = "openrc"'),
     "system.service_manager", "'systemd'"),
    ("name and file", lambda t: t.replace('name = "raspberry-pi-5"', 'name = "raspberry-pi-6"'),
     "name", "must match the file name"),
    ("unsupported without a reason", lambda t: re.sub(r"^notes = .*$", 'support = "unsupported"', t, flags=re.M),
     "(file)", "an unsupported profile must say why"),
    ("not TOML", lambda t: t.replace("[hardware]", "[hardware"), None, "is not valid TOML"),
]


@pytest.mark.parametrize(("case", "mutate", "key", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_malformed_profile_names_the_file_and_the_key(tmp_path, case, mutate, key, message):
    path = tmp_path / "raspberry-pi-5.toml"
    path.write_text(mutate((PROFILE_DIR / "raspberry-pi-5.toml").read_text()))
    with pytest.raises(ProfileError) as err:
        load_file(path)
    text = str(err.value)
    assert text.startswith(str(path)), text
    if key is not None:
        assert re.search(rf"(: |; ){re.escape(key)}: ", text), text
    assert message in text, text


def test_load_all_fails_on_the_first_broken_file(tmp_path):
    for p in PROFILE_DIR.glob("*.toml"):
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "x86-64-cpu.toml").write_text((tmp_path / "x86-64-cpu.toml").read_text().replace(
        "[hardware]", "[hardware]\ngpu = true"))
    with pytest.raises(ProfileError, match=r"x86-64-cpu.toml: hardware.gpu: Extra inputs"):
        load_all(tmp_path)
    assert profiles.names(tmp_path) == sorted(EXPECTED)


def test_docs_describe_every_profile_key():
    """docs/hardware.md documents every key of the schema and lists every profile."""
    doc = (ROOT / "docs" / "hardware.md").read_text()
    sections = {"": Profile}
    for name, field in Profile.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields") and name != "runtimes":
            sections[name] = ann
    from hardware.profiles import RuntimeSpec

    sections["runtimes"] = RuntimeSpec
    missing = []
    for section, model in sections.items():
        for key in model.model_fields:
            if key in sections and section == "":
                continue
            qualified = f"{section}.{key}" if section else key
            if f"`{qualified}`" not in doc:
                missing.append(qualified)
    assert not missing, f"docs/hardware.md does not document: {missing}"
    for name in EXPECTED:
        assert f"`{name}`" in doc

