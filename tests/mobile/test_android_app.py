"""The Android app's contract, proven on the host: its plain-Kotlin classes (compiled by `make kotlin` with Debian's
kotlinc, run on the JVM) preprocess real images exactly as mbquant's Python reference does, and rank the same
top-k from the same logits."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbquant.mobile.client import host_runner
from mbquant.mobile.preprocess import preprocess, spec_of

REPO = Path(__file__).resolve().parents[2]
JAR = REPO / "build" / "kotlin" / "host-check.jar"


def _kotlin(*args: str) -> str:
    if not JAR.is_file() or shutil.which("java") is None:
        pytest.fail(f"{JAR} is not built: run `make kotlin` (it installs the JDK and kotlinc from Debian)")
    return subprocess.run(["java", "-cp", str(JAR), "HostCheckKt", *map(str, args)], check=True, capture_output=True,
                          text=True).stdout


def _tensors(bundle: Path, images: list[Path], tmp: Path, shape) -> np.ndarray:
    _kotlin("tensors", bundle, tmp / "t.bin", *images)
    return np.fromfile(tmp / "t.bin", dtype="<f4").reshape(len(images), *shape)


def test_kotlin_preprocessing_equals_the_python_reference_on_real_images(phone_bundle, fmnist, tmp_path):
    images = sorted((fmnist / "val").rglob("*.png"))[::500][:20]
    spec = json.loads((phone_bundle / "preprocess.json").read_text())
    kotlin = _tensors(phone_bundle, images, tmp_path, (3, 64, 64))
    python = np.stack([preprocess(Image.open(p), spec) for p in images])
    assert np.abs(kotlin - python).max() < 1e-5


def test_kotlin_resize_and_crop_match_pillow_on_colour_images(phone_bundle, tmp_path):
    """The ImageNet-style contract (shorter side, centre crop) and RGB -> grayscale, on odd sizes, up and down."""
    bundle = tmp_path / "rgb"
    shutil.copytree(phone_bundle, bundle)
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(57, 83), (200, 130), (31, 47), (301, 299)]):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])
    preset = {"kind": "imagenet", "resolution": 56, "resize": 64, "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225]}
    for color in ("rgb", "grayscale"):
        spec = spec_of(preset)
        spec["color"]["mode"] = color
        (bundle / "preprocess.json").write_text(json.dumps(spec))
        kotlin = _tensors(bundle, images, tmp_path, (3, 56, 56))
        python = np.stack([preprocess(Image.open(p), spec) for p in images])
        assert np.abs(kotlin - python).max() < 1e-5, color


def test_kotlin_top_k_equals_python_on_the_programs_logits(phone_bundle, fmnist, tmp_path):
    from mbquant.mobile.client import inputs, labelled_images
    from mbquant.mobile.bundle import read_bundle

    bundle = read_bundle(phone_bundle)
    items = labelled_images(fmnist / "val", bundle.labels, 40)
    logits = host_runner().run(bundle.pte, inputs(bundle, items))
    path = tmp_path / "logits.bin"
    path.write_bytes(np.asarray(logits.shape, "<i4").tobytes() + logits.astype("<f4").tobytes())
    rows = [line.split() for line in _kotlin("topk", phone_bundle, path, 5).splitlines()]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for row, lg, prob in zip(rows, logits, p):
        order = sorted(range(len(lg)), key=lambda i: (-lg[i], i))[:5]
        assert [int(x.split(":")[0]) for x in row] == order
        assert np.allclose([float(x.split(":")[1]) for x in row], prob[order], atol=1e-6)
