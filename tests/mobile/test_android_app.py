"""The Android app's contract, proven on the host: its plain-Kotlin classes (compiled by `make kotlin` with Debian's
kotlinc, run on the JVM) preprocess real images exactly as mbquant's Python reference does, and rank the same
top-k from the same logits."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbquant.data.contract import apply
from mbquant.data.contract import spec_of as contract_of
from mbquant.data.images import decode
from mbquant.mobile.xnnpack.client import host_runner
from mbquant.records import PreprocessSpec
from tests.conftest import needs

REPO = Path(__file__).resolve().parents[2]
JAR = REPO / "build" / "kotlin" / "host-check.jar"
ORG_JSON = Path("/usr/share/java/com.android.json.jar")     # the platform's org.json (Debian's libandroid-json-java)


def _kotlin(*args: str) -> str:
    needs("the Kotlin classes", JAR.is_file() and ORG_JSON.is_file() and shutil.which("java") is not None,
          "run `make kotlin` (it installs the JDK, kotlinc and org.json from Debian)")
    return subprocess.run(["java", "-cp", f"{JAR}:{ORG_JSON}", "HostCheckKt", *map(str, args)], check=True,
                          capture_output=True, text=True).stdout


def _tensors(bundle: Path, images: list[Path], tmp: Path, shape) -> np.ndarray:
    _kotlin("tensors", bundle, tmp / "t.bin", *images)
    return np.fromfile(tmp / "t.bin", dtype="<f4").reshape(len(images), *shape)


def test_kotlin_preprocessing_equals_the_python_path_on_real_images(phone_bundle, fmnist, tmp_path):
    """The app's Preprocessor, the torch-free client and the dataset every mbquant stage evaluates with compute the
    same tensors, bit for bit, from the bundle's contract."""
    from mbquant.data.dataset import load_folder
    from mbquant.mobile.xnnpack.client import inputs
    from mbquant.mobile.bundle import read_bundle

    images = sorted((fmnist / "val").rglob("*.png"))[::500][:20]
    spec = PreprocessSpec.read(phone_bundle / "preprocess.json")
    kotlin = _tensors(phone_bundle, images, tmp_path, (3, 64, 64))
    python = np.stack([apply(decode(p), spec) for p in images])
    client, _ = inputs(read_bundle(phone_bundle), [(p, 0) for p in images])
    ds = load_folder(fmnist / "val", spec)
    pipeline = np.stack([ds[[s.path for s in ds.samples].index(p)][0].numpy() for p in images])
    assert np.array_equal(python, client) and np.array_equal(python, pipeline) and np.array_equal(kotlin, python)


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
        spec = dataclasses.replace(contract_of(preset), color=color)
        spec.write(bundle / "preprocess.json")
        kotlin = _tensors(bundle, images, tmp_path, (3, 56, 56))
        python = np.stack([apply(decode(p), spec) for p in images])
        assert np.array_equal(kotlin, python), color


def test_kotlin_top_k_equals_python_on_the_programs_logits(phone_bundle, fmnist, tmp_path):
    from mbquant.mobile.bundle import read_bundle
    from mbquant.mobile.xnnpack.client import inputs, labelled_images

    bundle = read_bundle(phone_bundle)
    x, _ = inputs(bundle, labelled_images(fmnist / "val", bundle.labels, 120))
    logits = host_runner().run(bundle.program, x[:40])
    path = tmp_path / "logits.bin"
    path.write_bytes(np.asarray(logits.shape, "<i4").tobytes() + logits.astype("<f4").tobytes())
    rows = [line.split() for line in _kotlin("topk", phone_bundle, path, 5).splitlines()]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for row, lg, prob in zip(rows, logits, p):
        order = sorted(range(len(lg)), key=lambda i: (-lg[i], i))[:5]
        assert [int(x.split(":")[0]) for x in row] == order
        assert np.allclose([float(x.split(":")[1]) for x in row], prob[order], atol=1e-6)
