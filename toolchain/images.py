"""Image-folder datasets: ``DIR/<class>/*.{jpg,jpeg,png}``, one sub-folder per class.

Classes are the sub-folders' names, sorted; rows are ordered by class, then by
file name, so a rebuild sees the same splits. Every image is decoded with
Pillow, converted to RGB and brought to the *capture size* (``--image-size
HxW``; by default the most common size in the folder) with bilinear
resampling: the size a device's camera delivers, and so what the model's input
is. Pixels stay raw (0–255) in float32, laid out (n, 3, height, width); the
model scales and normalises them in its graph (:mod:`toolchain.vision`).

A folder that cannot make a classifier is refused before anything is decoded
into memory: fewer than two classes, an empty class, a file that is not a JPEG
or PNG image or cannot be decoded (the message names the file).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from toolchain.data import Dataset, FeatureSpec, Schema
from toolchain.errors import DataError

__all__ = ["EXTENSIONS", "MAX_IMAGES", "MAX_PIXELS", "is_image_folder", "load_image_folder", "parse_size"]

EXTENSIONS = (".jpg", ".jpeg", ".png")
#: Formats Pillow must find in a file, whatever its extension says.
#: What the folder takes (MPO: a camera's JPEG with a second frame, read as its first) and the parsers Pillow may
#: try on an untrusted file.
_FORMATS = ("JPEG", "PNG", "MPO")
#: 16-bit and other deep modes, which RGB conversion would clip rather than scale.
_DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
MAX_IMAGES = 200_000
#: Pixels of one source image (a larger one is refused before it is decoded: a decompression bomb).
MAX_PIXELS = 40_000_000
#: Bytes the decoded dataset (float32 at the capture size) may take in memory.
MAX_DATASET_BYTES = 8 * 1024**3
#: Bounds on each side of the capture size.
MIN_SIDE, MAX_SIDE = 16, 2048


def is_image_folder(path: Path) -> bool:
    return path.is_dir()


def parse_size(text: str, what: str = "--image-size") -> tuple[int, int]:
    """``"128x96"`` (height × width) or ``"128"`` (square) → ``(128, 96)``."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        sides = [int(p) for p in parts]
    except ValueError:
        raise DataError(f"{what} {text!r}: write HEIGHTxWIDTH in pixels, e.g. 128x128") from None
    h, w = sides if len(sides) == 2 else (sides[0], sides[0])
    check_size((h, w), what)
    return h, w


def check_size(size: tuple[int, int], what: str = "--image-size") -> None:
    if not all(MIN_SIDE <= s <= MAX_SIDE for s in size):
        raise DataError(f"{what} {size[0]}x{size[1]}: each side must be between {MIN_SIDE} and {MAX_SIDE} pixels")


def _listing(root: Path) -> tuple[list[str], list[tuple[int, Path]]]:
    """Class names and (class id, file) pairs, or a DataError naming what does not belong."""
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    strays = [p for p in entries if not p.is_dir()]
    if strays:
        raise DataError(f"{strays[0]} lies directly in the image folder {root}; an image folder holds one "
                        "sub-folder per class and the images inside them: move it into its class's folder")
    classes = [p.name for p in entries]
    if len(classes) < 2:
        found = f"only the class {classes[0]!r}" if classes else "no class folders"
        raise DataError(f"image folder {root} has {found}; a classifier needs at least two classes, one "
                        f"sub-folder each (e.g. {root}/cat/*.jpg and {root}/dog/*.jpg)")
    files: list[tuple[int, Path]] = []
    for cid, cls in enumerate(classes):
        members = sorted(p for p in (root / cls).iterdir() if not p.name.startswith("."))
        for p in members:
            if p.is_dir():
                raise DataError(f"{p} is a folder inside the class folder {root / cls}; class folders hold images "
                                "only (one level: DIR/<class>/<image>)")
            if p.suffix.lower() not in EXTENSIONS:
                raise DataError(f"{p} is not a JPEG or PNG image (by its name); the image folder takes "
                                f"{', '.join(EXTENSIONS)} files only: convert or remove it")
        if not members:
            raise DataError(f"class folder {root / cls} holds no images; add some or remove the folder")
        files += [(cid, p) for p in members]
    if len(files) > MAX_IMAGES:
        raise DataError(f"image folder {root} holds {len(files)} images; the limit is {MAX_IMAGES}")
    return classes, files


def _sizes(files: list[tuple[int, Path]]) -> list[tuple[int, int]]:
    """(height, width) of every file, read from its header; refuses what is not a readable JPEG/PNG."""
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for _, path in files:
        try:
            with Image.open(path) as im:  # the header only, to name what the file is; decoding is _decode's
                fmt, (w, h), mode = im.format, im.size, im.mode
        except Image.DecompressionBombError:
            raise DataError(f"{path} declares more pixels than an image may have (a decompression bomb?); the "
                            f"limit is {MAX_PIXELS} pixels per image") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{path} cannot be read as an image ({type(exc).__name__}: {exc}); fix or remove "
                            "it") from None
        if fmt not in _FORMATS:
            raise DataError(f"{path} is a {fmt} image under a {path.suffix} name; the image folder takes JPEG "
                            "and PNG: convert it")
        if mode in _DEEP_MODES:
            raise DataError(f"{path} is a {mode} image (more than 8 bits per channel); the model takes 8-bit RGB "
                            "pixels: convert it to 8 bits")
        if w * h > MAX_PIXELS:
            raise DataError(f"{path} is {w}x{h} pixels; the limit is {MAX_PIXELS} pixels per image")
        sizes.append((h, w))
    return sizes


def _decode(path: Path, size: tuple[int, int]) -> np.ndarray:
    """(3, height, width) float32 raw RGB at ``size``."""
    from PIL import Image

    try:
        with Image.open(path, formats=_FORMATS) as im:  # checked by _sizes; the file may have changed since
            if im.size[0] * im.size[1] > MAX_PIXELS or im.mode in _DEEP_MODES:
                raise DataError(f"{path} changed while the folder was read ({im.size[0]}x{im.size[1]} {im.mode}); "
                                "read it again")
            im.load()
            rgb = im.convert("RGB")
    except Image.DecompressionBombError:
        raise DataError(f"{path} declares more pixels than an image may have (a decompression bomb?)") from None
    except (OSError, ValueError, SyntaxError) as exc:  # a truncated or corrupt file fails here, not at open
        raise DataError(f"{path} cannot be decoded ({type(exc).__name__}: {exc}); fix or remove it") from None
    h, w = size
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
    pixels: np.ndarray = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)
    return pixels


def load_image_folder(root: Path, image_size: tuple[int, int] | None = None, *, name: str | None = None
                      ) -> Dataset:
    """Read ``root/<class>/*.{jpg,jpeg,png}`` into a :class:`Dataset` of kind ``image``, shaped (n, 3, H, W)."""
    classes, files = _listing(root)
    sizes = _sizes(files)
    if image_size is None:
        counts = Counter(sizes)
        image_size = max(counts, key=lambda s: (counts[s], s))  # ties: the larger size
        check_size(image_size, f"the most common image size in {root} (give --image-size HxW)")
    else:
        check_size(image_size)
    h, w = image_size
    need = len(files) * 3 * h * w * 4
    if need > MAX_DATASET_BYTES:
        raise DataError(f"{len(files)} images at {h}x{w} take {need / 1024**3:.1f} GiB as float32; the limit is "
                        f"{MAX_DATASET_BYTES / 1024**3:.0f} GiB: give a smaller --image-size")
    x = np.empty((len(files), 3, h, w), dtype=np.float32)
    for i, (_, path) in enumerate(files):
        x[i] = _decode(path, image_size)
    y = np.array([cid for cid, _ in files], dtype=np.int64)
    resized = sum(1 for s in sizes if s != image_size)
    # ranges are checked on the first channel's first rows of pixels (a schema lists at most 1024 features)
    features = [FeatureSpec(name=f"px{i}", min=0.0, max=255.0) for i in range(min(3 * h * w, 1024))]
    schema = Schema(label="class", features=features, classes=classes)
    digest = hashlib.sha256(json.dumps({"classes": classes, "size": [h, w]}).encode())
    digest.update(x.tobytes())
    digest.update(y.tobytes())
    return Dataset(name=name or root.resolve().name, kind="image", x=x, y=y, classes=classes, schema=schema,
                   sha256=digest.hexdigest(), source=str(root),
                   extra={"capture_size": f"{h}x{w}", "images": str(len(files)), "resized": str(resized)})
