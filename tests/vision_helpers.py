"""A synthetic image folder the vision tests and the benchmark make for themselves: coloured shapes and stripes on
noisy backgrounds, one sub-folder per class, PNG and JPEG mixed."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import generate_signing_key, load_private_key, private_key_to_pem

CLASSES = ("blue_hstripes", "green_square", "red_disc", "yellow_vstripes")
_COLOURS = {"red_disc": (200, 40, 40), "green_square": (40, 170, 60), "blue_hstripes": (40, 70, 200),
            "yellow_vstripes": (210, 190, 40)}


def _draw(cls: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = size
    img = rng.normal(110, 25, size=(h, w, 3))
    colour = np.array(_COLOURS[cls], dtype=np.float64) + rng.normal(0, 20, size=3)
    rows, cols = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    r = rng.uniform(0.15, 0.3) * min(h, w)
    if cls == "red_disc":
        mask = (rows - cy) ** 2 + (cols - cx) ** 2 < r**2
    elif cls == "green_square":
        mask = (np.abs(rows - cy) < r) & (np.abs(cols - cx) < r)
    else:
        period = rng.integers(8, 16)
        along = rows if cls == "blue_hstripes" else cols
        mask = (along // (period // 2)) % 2 == 0
    img[mask] = colour + rng.normal(0, 12, size=(int(mask.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: int = 70, size: tuple[int, int] = (112, 112), seed: int = 0,
                      classes: tuple[str, ...] = CLASSES) -> Path:
    """``root/<class>/<i>.png|.jpg``: every third image a JPEG, the rest PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.fromarray(_draw(cls, size, rng))
            if i % 3 == 0:
                im.save(root / cls / f"{i:03d}.jpg", quality=92)
            else:
                im.save(root / cls / f"{i:03d}.png")
    return root


#: The image-folder build both vision test modules use: 4 classes × 50 images at 112×112, MobileNetV3-Small at
#: width 0.5 on a 96×96 input, 6 epochs (a few dozen optimiser steps on two CPU cores).
PER_CLASS, CAPTURE, INPUT, EPOCHS = 50, (112, 112), (96, 96), 6
MODEL = "toolchain.models:mobilenet_v3_small"
#: The int8 gate, in points: the test split holds 40 images, so one image is 2.5 points.
MAX_DROP = 5.0


@dataclass(frozen=True)
class VisionBuild:
    folder: Path
    bundle: Path
    key: Ed25519PrivateKey
    report: dict[str, Any]


def vision_build(base: Path) -> VisionBuild:
    """The build, made once under ``base`` (the session's temporary root) and reused by later callers."""
    root = base / "vision-build"
    folder, bundle, key_file = root / "images", root / "bundle", root / "signing.key"
    if not (bundle / "manifest.json").exists():
        from toolchain.pipeline import BuildSpec, build

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        make_image_folder(folder, per_class=PER_CLASS, size=CAPTURE)
        key_file.write_bytes(private_key_to_pem(generate_signing_key()))
        spec = BuildSpec(recipe="torch", out=bundle, key=key_file, data=folder, model=MODEL,
                         model_args={"width_mult": 0.5}, epochs=EPOCHS, tflite=False, tar=False, device="cpu",
                         max_drop=MAX_DROP, input_size=INPUT)
        build(spec)
    key = load_private_key(key_file.read_bytes())
    report = json.loads((bundle / "build-report.json").read_text())
    return VisionBuild(folder, bundle, key, report)
