"""Vision models from an image folder: the loader and its refusals, ``--model module:callable`` with keyword
arguments, the in-repository MobileNetV3-Small, the raw-pixel input wrapper, the bounded cost of the agent's
image summaries, and one build whose evaluated metric is recomputed here with ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from agent.summaries import image_summaries, summary_view
from protocol import generate_signing_key, private_key_to_pem
from server.cli import app
from tests.vision_helpers import CAPTURE, CLASSES, INPUT, PER_CLASS, make_image_folder, vision_build
from toolchain.data import split_indices
from toolchain.errors import DataError, ModelError
from toolchain.images import load_image_folder, parse_size
from toolchain.models import MobileNetV3, construct_model, mobilenet_v3_small, parse_model_args
from toolchain.validate import validate
from toolchain.vision import ImageInput, channel_stats, image_model


def _folder(root: Path, per_class: int = 3, size: tuple[int, int] = (24, 32)) -> Path:
    return make_image_folder(root, per_class=per_class, size=size, classes=CLASSES[:2])


# ---- the image-folder loader ----

def test_folder_reads_classes_sorted_raw_rgb_nchw(tmp_path):
    root = _folder(tmp_path / "imgs")
    Image.new("L", (16, 20), color=77).save(root / CLASSES[1] / "grey.png")  # another size, one channel
    ds = load_image_folder(root)
    assert ds.kind == "image" and ds.classes == sorted(CLASSES[:2])
    assert ds.x.shape == (7, 3, 24, 32) and ds.x.dtype == np.float32  # the most common size, (n, 3, H, W)
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert ds.extra["capture_size"] == "24x32" and ds.extra["resized"] == "1"
    grey = ds.x[list(sorted(p.name for p in (root / CLASSES[1]).iterdir())).index("grey.png") + 3]
    np.testing.assert_array_equal(grey, 77.0)  # grey to RGB, resized: raw 0-255 values, not scaled
    png = np.asarray(Image.open(root / CLASSES[0] / "001.png").convert("RGB"), dtype=np.float32)
    np.testing.assert_array_equal(ds.x[1], png.transpose(2, 0, 1))
    assert ds.x.min() >= 0.0 and ds.x.max() <= 255.0 and ds.x.max() > 100.0


def test_image_size_brings_every_image_to_it(tmp_path):
    ds = load_image_folder(_folder(tmp_path / "imgs"), (40, 20))
    assert ds.input_shape == (3, 40, 20)
    assert parse_size("128x96") == (128, 96) and parse_size("64") == (64, 64)
    with pytest.raises(DataError, match="HEIGHTxWIDTH"):
        parse_size("big")
    with pytest.raises(DataError, match="between 16 and 2048"):
        parse_size("8x8")


def _one_class(root: Path) -> str:
    make_image_folder(root, per_class=2, size=(20, 20), classes=CLASSES[:1])
    return "only the class"


def _empty_class(root: Path) -> str:
    _folder(root)
    (root / "zebra").mkdir()
    return f"class folder {root / 'zebra'} holds no images"


def _text_file(root: Path) -> str:
    _folder(root)
    (root / CLASSES[0] / "notes.txt").write_text("hello")
    return f"{root / CLASSES[0] / 'notes.txt'} is not a JPEG or PNG"


def _corrupt(root: Path) -> str:
    _folder(root)
    (root / CLASSES[1] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return f"{root / CLASSES[1] / 'broken.png'} cannot be read"


def _truncated(root: Path) -> str:
    _folder(root)
    good = (root / CLASSES[1] / "000.jpg").read_bytes()
    (root / CLASSES[1] / "000.jpg").write_bytes(good[: len(good) * 4 // 5])  # header intact, pixels cut
    return f"{root / CLASSES[1] / '000.jpg'} cannot be decoded"


def _gif(root: Path) -> str:
    _folder(root)
    Image.new("RGB", (24, 32)).save(root / CLASSES[0] / "moving.png", format="GIF")
    return "is a GIF image"


def _stray(root: Path) -> str:
    _folder(root)
    Image.new("RGB", (24, 32)).save(root / "loose.png")
    return f"{root / 'loose.png'} lies directly in the image folder"


@pytest.mark.parametrize("case", [_one_class, _empty_class, _text_file, _corrupt, _truncated, _gif, _stray])
def test_a_folder_that_cannot_make_a_classifier_is_refused_naming_the_problem(tmp_path, case):
    root = tmp_path / "imgs"
    expected = case(root)
    with pytest.raises(DataError) as err:
        load_image_folder(root)
    assert expected in str(err.value)


@pytest.mark.integration
@pytest.mark.parametrize("case", [_one_class, _corrupt])
def test_cli_refuses_a_bad_folder_exit_1_nothing_written(tmp_path, case):
    root = tmp_path / "imgs"
    expected = case(root)
    (tmp_path / "signing.key").write_bytes(private_key_to_pem(generate_signing_key()))
    out = tmp_path / "out" / "bundle"
    result = CliRunner().invoke(app, ["build", "--data", str(root), "--model", "toolchain.models:mobilenet_v3_small",
                                      "--out", str(out), "--key", str(tmp_path / "signing.key"), "--epochs", "1"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    assert expected in " ".join(result.output.split())
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("args, problem", [
    (["--model-arg", "num_classes"], "write KEY=VALUE"),
    (["--model-arg", "a=1", "--model-arg", "a=2"], "is given twice"),
    (["--image-size", "12x12"], "between 16 and 2048"),
    (["--input-size", "64x64"], "below 96x96"),
    (["--model-arg", "depth=3", "--input-size", "96x96"], "unexpected keyword argument 'depth'"),
])
def test_cli_refuses_bad_model_and_size_options(tmp_path, args, problem):
    root = _folder(tmp_path / "imgs", per_class=6)
    (tmp_path / "signing.key").write_bytes(private_key_to_pem(generate_signing_key()))
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["build", "--data", str(root), "--model", "toolchain.models:mobilenet_v3_small",
                                      *args, "--out", str(out), "--key", str(tmp_path / "signing.key"),
                                      "--epochs", "1"], env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    assert problem in " ".join(result.output.split())
    assert not out.exists()


# ---- --model module:callable with keyword arguments ----

@pytest.mark.parametrize("items, expected", [
    (["num_classes=4"], {"num_classes": 4}),
    (["width_mult=0.5", "dropout=1e-1"], {"width_mult": 0.5, "dropout": 0.1}),
    (["pretrained=false", "flag=True"], {"pretrained": False, "flag": True}),
    (["name=small", "neg=-3", "empty="], {"name": "small", "neg": -3, "empty": ""}),
])
def test_model_args_are_typed(items, expected):
    got = parse_model_args(items)
    assert got == expected and [type(v) for v in got.values()] == [type(v) for v in expected.values()]


def test_construct_model_takes_a_factory_or_a_class_with_arguments():
    net = construct_model("toolchain.models:mobilenet_v3_small", {"num_classes": 3, "width_mult": 0.25})
    assert isinstance(net, MobileNetV3) and net.classifier[-1].out_features == 3
    assert isinstance(construct_model("toolchain.models:MobileNetV3", {"num_classes": 5}), MobileNetV3)
    with pytest.raises(ModelError, match="unexpected keyword argument 'depth'"):
        construct_model("toolchain.models:mobilenet_v3_small", {"depth": 3})
    with pytest.raises(ModelError, match=r"returned a float, not a torch\.nn\.Module"):
        construct_model("time:time")
    with pytest.raises(ModelError, match=r"no torch\.nn\.Module class or model-making function named 'nope'"):
        construct_model("toolchain.models:nope")
    with pytest.raises(ModelError, match="module:Class or module:function"):
        construct_model("mobilenet_v3_small")


def test_image_model_fills_num_classes_loads_weights_and_checks_the_output(tmp_path):
    ds = load_image_folder(_folder(tmp_path / "imgs", size=(40, 40)))
    ref = "toolchain.models:mobilenet_v3_small"
    model, pre = image_model(ref, {"width_mult": 0.25}, None, ds, ds.x, (96, 96))
    assert model.core.classifier[-1].out_features == 2 and model.size == (96, 96) and model.capture == (40, 40)
    assert pre.in_graph and "resized to 96x96" in pre.description
    saved = mobilenet_v3_small(num_classes=2, width_mult=0.25)
    torch.save(saved.state_dict(), tmp_path / "w.pt")
    loaded, _ = image_model(ref, {"width_mult": 0.25}, tmp_path / "w.pt", ds, ds.x, (96, 96))
    assert all(torch.equal(a, b) for a, b in zip(loaded.core.state_dict().values(), saved.state_dict().values(),
                                                  strict=True))
    with pytest.raises(ModelError, match="does not fit"):
        image_model(ref, {"width_mult": 0.5}, tmp_path / "w.pt", ds, ds.x, (96, 96))
    with pytest.raises(ModelError, match="pass --model-arg num_classes=2"):
        image_model(ref, {"num_classes": 3, "width_mult": 0.25}, None, ds, ds.x, (96, 96))


# ---- MobileNetV3-Small and the raw-pixel input ----

def test_mobilenet_v3_small_has_the_papers_size():
    # 2,542,856 parameters at 1000 classes: the paper's 2.5M, and torchvision's count for the same network
    assert sum(p.numel() for p in mobilenet_v3_small().parameters()) == 2_542_856
    net = mobilenet_v3_small(num_classes=4, width_mult=0.5).eval()
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"Hardswish", "_SqueezeExcite", "_InvertedResidual"} <= kinds
    depthwise = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(depthwise) == 11  # one per bottleneck block
    assert net(torch.zeros(2, 3, 96, 96)).shape == (2, 4)


def test_image_input_resizes_scales_and_normalises_in_the_graph():
    core = mobilenet_v3_small(num_classes=3, width_mult=0.25).eval()
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(2, 3, 112, 120)).astype(np.float32)
    mean, std = channel_stats(raw)
    wrapped = ImageInput(core, (112, 120), (96, 96), mean, std).eval()
    by_hand = torch.nn.functional.interpolate(torch.as_tensor(raw), size=(96, 96), mode="bilinear",
                                              align_corners=False) / 255.0
    by_hand = (by_hand - torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) / torch.as_tensor(
        std, dtype=torch.float32).view(1, 3, 1, 1)
    with torch.no_grad():
        diff = float((wrapped(torch.as_tensor(raw)) - core(by_hand)).abs().max())
    assert diff < 1e-4, diff
    np.testing.assert_allclose(mean, raw.mean(axis=(0, 2, 3)) / 255.0, rtol=1e-6)


# ---- the agent's image summaries: bounded work per image ----

@pytest.mark.parametrize("size", [(96, 96), (112, 112), (224, 224), (480, 640), (1080, 1920), (2048, 97)])
def test_image_summaries_touch_a_bounded_number_of_pixels(size):
    h, w = size
    view = summary_view(np.zeros((1, 3, h, w), dtype=np.float32))
    touched = view.shape[2] * view.shape[3]
    assert touched <= 64 * 64, (size, touched)  # per channel, whatever the resolution
    assert max(view.shape[2:]) > 32  # and still a real sample of the image
    # the summaries read those pixels and no others: changing every other pixel changes nothing
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, size=(2, 3, h, w)).astype(np.float32)
    y = rng.uniform(0, 255, size=x.shape).astype(np.float32)
    stride = -(-max(h, w) // 64)
    y[:, :, ::stride, ::stride] = x[:, :, ::stride, ::stride]
    np.testing.assert_array_equal(image_summaries(x), image_summaries(y))


# ---- one build on a generated image folder (shared with tests/test_vision_e2e.py) ----

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return vision_build(tmp_path_factory.getbasetemp())


@pytest.mark.integration
def test_build_ships_raw_pixel_models_and_its_metric_is_what_onnx_runtime_computes(built):
    manifest = json.loads((built.bundle / "manifest.json").read_text())["manifest"]
    arts = {a["name"]: a for a in manifest["artifacts"]}
    fp32 = next(a for a in arts.values() if a["target"] == "onnx" and a["precision"] == "fp32")
    assert any(a["target"] == "onnx" and a["precision"] == "int8" for a in arts.values()), (
        arts.keys(), built.report.get("rejected"), built.report.get("skipped"))
    assert fp32["inputs"][0]["shape"][1:] == [3, *CAPTURE]  # the device sends the capture, raw
    pre = manifest["preprocessing"]
    assert pre["in_graph"] and len(pre["mean"]) == 3 and "resized to 96x96" in pre["description"]
    assert manifest["reference"]["kind"] == "image"
    assert manifest["lineage"]["model_class"] == "toolchain.models:mobilenet_v3_small"

    ds = load_image_folder(built.folder)
    assert len(ds.y) == PER_CLASS * len(CLASSES)
    _, kept = validate(ds)
    test = kept[split_indices(ds.y[kept], int(manifest["lineage"]["seed"]))["test"]]
    for art in arts.values():
        if art["target"] != "onnx":
            continue
        sess = ort.InferenceSession(str(built.bundle / "artifacts" / art["sha256"]),
                                    providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].shape[1:] == [3, *CAPTURE]
        scores = sess.run(None, {sess.get_inputs()[0].name: ds.x[test]})[0]
        accuracy = float((scores.argmax(1) == ds.y[test]).mean())
        assert art["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6), art["name"]
    # trained from scratch on the folder, the network has learnt something
    assert fp32["metrics"]["accuracy"] > 1.5 / len(CLASSES), built.report["training"]["history"][-1]
    graph = onnx.load(str(built.bundle / "artifacts" / fp32["sha256"]))
    ops = {n.op_type for n in graph.graph.node} | {n.op_type for f in graph.functions for n in f.node}
    assert "Resize" in ops, ops  # capture 112x112 -> the network's 96x96, in the graph
    assert CAPTURE != INPUT


@pytest.mark.integration
def test_raw_pixel_golden_inputs_travel_in_a_schema_3_manifest_under_its_size_limit(built):
    """A 112x112x3 input is larger than a /1 or /2 manifest's golden inputs may be: the build ships fewer golden
    inputs (raw pixels, exactly what a device sends) under schema /3, every artifact with its smoke expectation,
    and the signed manifest well under its 1 MiB."""
    from protocol.manifest import GOLDEN_VALUES_2
    from toolchain.pipeline import GOLDEN_TOTAL_VALUES

    raw = (built.bundle / "manifest.json").read_bytes()
    manifest = json.loads(raw)["manifest"]
    values = 3 * CAPTURE[0] * CAPTURE[1]
    assert values > GOLDEN_VALUES_2 and manifest["schema"] == "edgeherd.manifest/3"
    golden = manifest["golden"]["inputs"]
    assert 1 <= len(golden) <= GOLDEN_TOTAL_VALUES // values and all(len(g) == values for g in golden)
    assert all(min(g) >= 0.0 and max(g) <= 255.0 for g in golden)  # raw pixels, not normalised
    assert all(len(a["smoke"]["outputs"]) == len(golden) for a in manifest["artifacts"])
    assert "smoke" not in built.report.get("skipped", {})
    assert len(raw) < 1024 * 1024


def _bomb(root: Path) -> str:
    """A small PNG whose header declares 20000x20000 pixels."""
    import struct
    import zlib

    _folder(root)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    (root / CLASSES[0] / "bomb.png").write_bytes(png)
    return "bomb.png declares more pixels than an image may have"


def _deep(root: Path) -> str:
    _folder(root)
    Image.fromarray((np.arange(24 * 32, dtype=np.uint16) * 80).reshape(24, 32)).save(root / CLASSES[0] / "deep.png")
    return "more than 8 bits per channel"


@pytest.mark.parametrize("case", [_bomb, _deep])
def test_a_bomb_or_a_deep_image_is_refused_naming_the_file(tmp_path, case):
    expected = case(tmp_path / "images")
    with pytest.raises(DataError, match=expected):
        load_image_folder(tmp_path / "images")


def test_a_camera_jpeg_with_a_second_frame_is_read(tmp_path):
    """Pillow names a JPEG carrying an MPF second frame (many phone photos) "MPO": it is a JPEG, read as its first
    frame."""
    root = tmp_path / "images"
    _folder(root)
    first, second = Image.new("RGB", (24, 32), (250, 0, 0)), Image.new("RGB", (24, 32), (0, 0, 250))
    first.save(root / CLASSES[0] / "camera.jpg", format="MPO", save_all=True, append_images=[second])
    with Image.open(root / CLASSES[0] / "camera.jpg") as im:
        assert im.format == "MPO"
    ds = load_image_folder(root)
    reds = ds.x[:, 0].mean(axis=(1, 2)) - ds.x[:, 2].mean(axis=(1, 2))
    assert len(ds.x) == 7 and reds.max() > 200  # the red first frame was read (the drawn classes hold no red)
