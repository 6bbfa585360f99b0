"""Shared fixtures. Real data only: Fashion-MNIST prepared by `make test` into ./data (or $MBQUANT_DATA)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
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
    from mbquant.fashion_mnist import prepare_fashion_mnist

    root = Path(os.environ.get("MBQUANT_DATA", REPO / "data"))
    prepare_fashion_mnist(root, progress=False)  # idempotent: a no-op when already prepared
    return root


def copy_subset(src: Path, dst: Path, per_class: int, classes: list[str] | None = None) -> Path:
    """Copy the first ``per_class`` real images of each class of ``src`` into ``dst``."""
    for cdir in sorted(d for d in src.iterdir() if d.is_dir()):
        if classes is not None and cdir.name not in classes:
            continue
        (dst / cdir.name).mkdir(parents=True, exist_ok=True)
        for p in sorted(cdir.glob("*.png"))[:per_class]:
            shutil.copy(p, dst / cdir.name / p.name)
    return dst


@pytest.fixture(scope="session")
def small_folder(fmnist, tmp_path_factory) -> Path:
    """10 classes x 12 real training images."""
    return copy_subset(fmnist / "train", tmp_path_factory.mktemp("small") / "images", 12)


@pytest.fixture(scope="session")
def small_val(fmnist, tmp_path_factory) -> Path:
    """10 classes x 10 real validation images."""
    return copy_subset(fmnist / "val", tmp_path_factory.mktemp("smallval") / "images", 10)


@pytest.fixture(scope="session")
def shipped_dir() -> Path:
    return REPO / "mbquant" / "checkpoints"


@pytest.fixture(scope="session")
def tiny_ckpt(small_folder, small_val, tmp_path_factory):
    """A MobileNetV1 0.25 at 32x32 trained one epoch by `mbquant train` on 120 real images: (data root, .pth)."""
    from mbquant.cli import main

    root = tmp_path_factory.mktemp("tiny")
    shutil.copytree(small_folder, root / "train")
    shutil.copytree(small_val, root / "val")
    ck = root / "v1.pth"
    rc = main(["train", "mobilenet_v1", "--data", str(root), "--width-mult", "0.25", "--resolution", "32",
               "--epochs", "1", "--batch-size", "16", "--out", str(ck), "--quiet"])
    assert rc == 0 and ck.exists()
    return root, ck


def quantize_pt2e(model, resolution: int, calib, **config):
    """The XNNPACK backend's INT8 graph of ``model`` (prepare -> calibrate on real images -> convert); ``config``
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
    """40 real calibration images at 32x32 (the small preset)."""
    from mbquant import calibrate
    from mbquant.data import small_preset

    return calibrate.from_folder(small_folder, small_preset(32), 40, seed=0)


def phone_job(fmnist, out, *, weights=None, calib=256, eval_limit=2000, float_program=True, **config):
    """The whole job on the shipped phone checkpoint (default recipe): calibration from train, a seeded
    stratified slice of val; returns the report dict."""
    from mbquant import calibrate
    from mbquant.config import QuantConfig, RunConfig
    from mbquant.pipeline import load_eval_set, run_job
    from mbquant.resolve import resolve_model

    model, info = resolve_model("mobilenet_v2", weights)
    cfg = QuantConfig(num_calib=calib, **config)
    return run_job(model, info, calib=calibrate.from_folder(fmnist / "train", info.preset, calib, seed=0,
                                                              expected_classes=info.classes),
                   eval_set=load_eval_set(fmnist / "val", info, eval_limit), out_dir=out, config=cfg,
                   run=RunConfig(latency_runs=5, eval_limit=eval_limit,
                                 float_program=float_program)).to_dict()


class FlowRuns:
    """Each flow of tests/baselines (its CLI command on real data) run at most once per session and size."""

    def __init__(self, data: Path, work: Path):
        self.data, self.work, self.done = data, work, {}

    def get(self, key: str, images: int = 2000) -> tuple[Path, dict]:
        from mbquant.cli import main
        from tests.baselines.flows import FLOWS

        if (key, images) not in self.done:
            out = self.work / f"{key}.{images}"
            rc = main(FLOWS[key].argv(self.data, out, images))
            rep = json.loads((out / "report.json").read_text())
            assert rc == 0 and rep["status"] == "ok", rep["failures"]
            self.done[key, images] = out, rep
        return self.done[key, images]


@pytest.fixture(scope="session")
def flow_runs(fmnist, tmp_path_factory) -> FlowRuns:
    return FlowRuns(fmnist, tmp_path_factory.mktemp("flows"))


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
