"""Shared fixtures and the test tiers.

``make test`` (and ``make test-slow``) run on real data: Fashion-MNIST prepared into ./data (or $MBQUANT_DATA), the
ARM runners, the Kotlin classes and the Arm toolchain; a missing one is a failure there. ``make test-unit``
(``MBQUANT_TIER=unit``) needs none of them: small image folders are synthetic (class-dependent patterns drawn with
numpy, saved as PNG), and a test that needs the real data or a tool is skipped with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
UNIT = os.environ.get("MBQUANT_TIER") == "unit"
FMNIST_CLASSES = ("ankle_boot", "bag", "coat", "dress", "pullover", "sandal", "shirt", "sneaker", "t-shirt_top",
                  "trouser")


def needs(what: str, available: bool, fix: str) -> None:
    """A tool or data a test needs: skipped with the reason in the unit tier, a failure in `make test`."""
    if available:
        return
    if UNIT:
        pytest.skip(f"unit tier: {what} is not set up here ({fix}; `make test` runs this)")
    pytest.fail(f"{what} is missing: {fix}")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    # while the flows run in a background process (see pytest_collection_modifyitems) each process takes one core
    torch.set_num_threads(1 if _PREFETCH.get("proc") else max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is as fast, and far faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fmnist() -> Path:
    """The prepared Fashion-MNIST ImageFolder root (train/ and val/)."""
    if UNIT:
        pytest.skip("unit tier: no downloaded data (`make test` runs this on Fashion-MNIST)")
    from mbquant.data.fashion_mnist import prepare_fashion_mnist

    root = Path(os.environ.get("MBQUANT_DATA", REPO / "data"))
    prepare_fashion_mnist(root, progress=False)  # idempotent: a no-op when already prepared
    return root


def copy_subset(src: Path, dst: Path, per_class: int, classes: list[str] | None = None) -> Path:
    """Copy the first ``per_class`` images of each class of ``src`` into ``dst``."""
    for cdir in sorted(d for d in src.iterdir() if d.is_dir()):
        if classes is not None and cdir.name not in classes:
            continue
        (dst / cdir.name).mkdir(parents=True, exist_ok=True)
        for p in sorted(cdir.glob("*.png"))[:per_class]:
            shutil.copy(p, dst / cdir.name / p.name)
    return dst


def synthetic_folder(dst: Path, per_class: int, seed: int) -> Path:
    """10 classes of 28x28 grayscale PNGs: each class a bar at its own angle and place, with noise (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    for c, name in enumerate(FMNIST_CLASSES):
        (dst / name).mkdir(parents=True, exist_ok=True)
        angle = np.pi * c / 10
        for i in range(per_class):
            off = rng.normal(0, 1.5)
            d = np.abs((xx - 14) * np.sin(angle) - (yy - 14) * np.cos(angle) - (c - 5) + off)
            img = np.clip(255 * np.exp(-d ** 2 / 6) + rng.normal(0, 20, (28, 28)), 0, 255).astype(np.uint8)
            Image.fromarray(img, "L").save(dst / name / f"{seed:02d}{i:04d}.png")
    return dst


def _small(tmp_path_factory, name: str, split: str, per_class: int, seed: int) -> Path:
    dst = tmp_path_factory.mktemp(name) / "images"
    if UNIT:
        return synthetic_folder(dst, per_class, seed)
    root = Path(os.environ.get("MBQUANT_DATA", REPO / "data"))
    if not (root / split / ".complete").is_file():
        from mbquant.data.fashion_mnist import prepare_fashion_mnist

        prepare_fashion_mnist(root, progress=False)
    return copy_subset(root / split, dst, per_class)


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory) -> Path:
    """10 classes x 12 training images (real; synthetic in the unit tier)."""
    return _small(tmp_path_factory, "small", "train", 12, 1)


@pytest.fixture(scope="session")
def small_val(tmp_path_factory) -> Path:
    """10 classes x 10 validation images (real; synthetic in the unit tier)."""
    return _small(tmp_path_factory, "smallval", "val", 10, 2)


@pytest.fixture(scope="session")
def shipped_dir() -> Path:
    return REPO / "mbquant" / "checkpoints"


@pytest.fixture(scope="session")
def tiny_ckpt(small_val, tmp_path_factory):
    """A MobileNetV1 0.25 at 32x32 trained four epochs by `mbquant train` on 400 images (well above chance, as a
    model must be for a drop to mean anything): (data root with train/ and val/ (100 images), .pth)."""
    from mbquant.cli import main

    root = tmp_path_factory.mktemp("tiny")
    shutil.copytree(_small(tmp_path_factory, "tinytrain", "train", 40, 3), root / "train")
    shutil.copytree(small_val, root / "val")
    ck = root / "v1.pth"
    rc = main(["train", "mobilenet_v1", "--data", str(root), "--width-mult", "0.25", "--resolution", "32",
               "--epochs", "4", "--batch-size", "32", "--bn-recalibration", "400", "--out", str(ck), "--quiet"])
    assert rc == 0 and ck.exists()
    return root, ck


@pytest.fixture(scope="session")
def tiny_run(tiny_ckpt, tmp_path_factory):
    """A verified run of the tiny model evaluated on every image of its val folder (100), with its app bundle:
    (data root, run folder, bundle). Shared by the bundle and command-safety tests: copy before changing anything."""
    from mbquant.cli import main

    root, ck = tiny_ckpt
    out = tmp_path_factory.mktemp("tinyrun") / "run"
    assert main(["ptq", "mobilenet_v1", "--weights", str(ck), "--calib", str(root / "train"), "--eval",
                 str(root / "val"), "--num-calib", "32", "--no-float-program", "--latency-runs", "1",
                 "--out", str(out), "--bundle", str(out.parent / "bundle"), "--quiet"]) == 0
    return root, out, out.parent / "bundle"


def stub_lowering(monkeypatch) -> None:
    """The phone backend writes a few placeholder bytes instead of lowering (a minute at real sizes, seconds here):
    for tests of what happens around a write (a full disk, an interrupt), never of what the program computes."""
    import importlib

    lower = importlib.import_module("mbquant.mobile.xnnpack.lower")
    monkeypatch.setattr(importlib.import_module("mbquant.mobile.xnnpack.pte"), "lower",
                        lambda gm, resolution, batch=1: lower.Lowered(b"\0" * 64, lower.Delegation(1, 0, 1)))


def quantize_pt2e(model, resolution: int, calib, **config):
    """The phone backend's INT8 graph of ``model`` (prepare -> calibrate on real images -> convert); ``config``
    overrides the QuantConfig (recipe ``best`` otherwise, resolved for pte-xnnpack)."""
    from mbquant.config import QuantConfig
    from mbquant.mobile import table
    from mbquant.pipeline import quantize_with
    from mbquant.quant.export import FloatModel

    spec = table.get_spec("pte-xnnpack")
    cfg = table.resolve(QuantConfig(**{"num_calib": calib.requested, "seed": calib.seed, **config}), spec)
    return quantize_with(table.load(spec), FloatModel(model, resolution), cfg, calib)


@pytest.fixture(scope="session")
def calib32(small_folder):
    """40 calibration images at 32x32 (the small preset)."""
    from mbquant import calibrate
    from mbquant.data import small_preset
    from mbquant.data.contract import spec_of

    return calibrate.from_folder(small_folder, spec_of(small_preset(32)), 40, seed=0)


def phone_job(fmnist, out, *, weights=None, calib=256, eval_limit=2000, float_program=True, **config):
    """The whole job on the shipped phone checkpoint (default recipe): calibration from train, a seeded
    stratified slice of val; returns the report dict."""
    from mbquant import calibrate
    from mbquant.config import QuantConfig, RunConfig
    from mbquant.data.contract import spec_of
    from mbquant.data.dataset import eval_set
    from mbquant.models import resolve_model
    from mbquant.pipeline import run_job

    model, info = resolve_model("mobilenet_v2", weights)
    cfg = QuantConfig(num_calib=calib, **config)
    spec = spec_of(info.preset)
    return run_job(model, info, calib=calibrate.from_folder(fmnist / "train", spec, calib, seed=0,
                                                              expected_classes=info.classes),
                   eval_set=eval_set(fmnist / "val", spec, classes=info.classes, limit=eval_limit), out_dir=out,
                   config=cfg, run=RunConfig(latency_runs=5, eval_limit=eval_limit,
                                             float_program=float_program)).to_dict()


FLOW_FIXTURES = {"flow_runs", "phone_run", "phone_bundle"}


class FlowRuns:
    """Each flow of tests/baselines (its CLI command on real data) run at most once per session and size: in a
    background process started when the session begins (see :func:`pytest_collection_modifyitems`), or here."""

    def __init__(self, data: Path, work: Path, prefetched: dict | None = None):
        self.data, self.work, self.done = data, work, {}
        self.prefetched = prefetched or {}     # (key, images) -> (run folder, rc file)

    def get(self, key: str, images: int = 2000) -> tuple[Path, dict]:
        import time

        from mbquant.cli import main
        from tests.baselines.flows import FLOWS

        if (key, images) not in self.done:
            if (key, images) in self.prefetched:
                out, rc_file = self.prefetched[key, images]
                start = time.monotonic()
                while not rc_file.exists() and time.monotonic() - start < 3600:
                    time.sleep(0.2)
                rc = int(rc_file.read_text()) if rc_file.exists() else -1
                log = (rc_file.parent / "prefetch.log")
                assert rc == 0, f"{key} ({images} images) ended with {rc}: {log.read_text()[-2000:] if log.exists() else ''}"
            else:
                out = self.work / f"{key}.{images}"
                rc = main(FLOWS[key].argv(self.data, out, images))
            rep = json.loads((out / "report.json").read_text())
            assert rc == 0 and rep["status"] == "ok", rep["failures"]
            self.done[key, images] = out, rep
        return self.done[key, images]


_PREFETCH: dict = {}


def _uses_flows(item) -> bool:
    return bool(FLOW_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(session, config, items):
    """In `make test`: the tests that need the baseline flows run last, and the flows they need start now in a
    background process, so both cores work while the other tests run."""
    if UNIT or os.environ.get("MBQUANT_NO_PREFETCH"):
        return
    flows = [i for i in items if _uses_flows(i)]
    if not flows:
        return
    items[:] = [i for i in items if not _uses_flows(i)] + flows
    wanted = []
    for item in flows:
        spec = getattr(item, "callspec", None)
        if spec is not None and "key" in spec.params and "images" in spec.params:
            wanted.append((spec.params["key"], spec.params["images"]))
    if any("phone_run" in i.fixturenames or "phone_bundle" in i.fixturenames for i in flows):
        wanted.insert(0, ("mobilenet_v2_w0.5_r64_fmnist.ptq-phone", 2000))
    wanted = list(dict.fromkeys(wanted))
    if len(wanted) < 2:
        return
    import subprocess
    import sys
    import tempfile

    data = Path(os.environ.get("MBQUANT_DATA", REPO / "data"))
    if not (data / "val" / ".complete").is_file():
        return
    work = Path(tempfile.mkdtemp(prefix="mbquant-flows-"))
    proc = subprocess.Popen([sys.executable, "-m", "tests.baselines.prefetch", str(data), str(work),
                             *(f"{k}:{n}" for k, n in wanted)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    _PREFETCH.update(proc=proc, work=work, flows={(k, n): (work / f"{k}.{n}", work / f"{k}.{n}.rc")
                                                  for k, n in wanted})


def pytest_sessionfinish(session, exitstatus):
    proc = _PREFETCH.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    if _PREFETCH.get("work") is not None:
        shutil.rmtree(_PREFETCH["work"], ignore_errors=True)


@pytest.fixture(scope="session")
def flow_runs(fmnist, tmp_path_factory) -> FlowRuns:
    return FlowRuns(fmnist, tmp_path_factory.mktemp("flows"), _PREFETCH.get("flows"))


@pytest.fixture(scope="session")
def phone_run(flow_runs):
    """`mbquant ptq mobilenet_v2 --latency-runs 5 --eval-limit 2000` (the default recipe on the shipped phone
    checkpoint, 512 calibration images from train, 2,000 stratified val images): (run folder, report)."""
    return flow_runs.get("mobilenet_v2_w0.5_r64_fmnist.ptq-phone")


@pytest.fixture(scope="session")
def phone_bundle(phone_run, tmp_path_factory):
    from mbquant.mobile.bundle import write_bundle

    return write_bundle(phone_run[0], tmp_path_factory.mktemp("bundle") / "phone")


@pytest.fixture(scope="session")
def degraded_run(fmnist, tmp_path_factory):
    """A deliberately broken quantization: the width-0.35 checkpoint with per-tensor weights (depthwise included),
    the stock recipe and no cross-layer equalization; published (no --max-drop gate), so checks can catch it.
    (run folder, report)."""
    out = tmp_path_factory.mktemp("degraded") / "run"
    return out, phone_job(fmnist, out, weights="mobilenet_v2_w0.35_r64_fmnist", calib=64, eval_limit=200,
                          recipe="stock", granularity="per-tensor", equalize=False, float_program=False)
