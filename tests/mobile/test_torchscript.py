"""TorchScript artifacts: written atomically, reloaded in a fresh process (.ptl in the lite interpreter), measured."""
import json

import pytest
import torch

from mbquant import calibrate
from mbquant.config import QuantConfig
from mbquant.data import load_folder, small_preset
from mbquant.errors import ExportError, VerificationError
from mbquant.mobile import torchscript as ts
from mbquant.models import ModelInfo, create
from mbquant.quant import eager
from tests.quant.test_eager_fuse import nontrivial

RES = 32
CFG = QuantConfig(num_calib=40, batch_size=20)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def exported(small_folder, small_val, tmp_path_factory):
    """mobilenet_v2 w0.35 at 32x32, calibrated on 40 real images, exported and measured on 100 real images."""
    torch.manual_seed(0)
    model = nontrivial(create("mobilenet_v2", num_classes=10, width_mult=0.35))
    info = ModelInfo("mobilenet_v2", 10, 0.35, small_preset(RES))
    calib = calibrate.from_folder(small_folder, info.preset, 40, seed=0)
    eval_set = load_folder(small_val, info.preset)
    out = tmp_path_factory.mktemp("ts")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = ts.export_torchscript(model, info, calib, eval_set, out, config=CFG, eval_batch_size=32, latency_runs=5)
    finally:
        torch.set_num_threads(before)
    return {"report": report, "out": out, "model": model, "info": info, "eval_set": eval_set, "calib": calib}


def test_both_files_and_sidecars_are_written_atomically(exported):
    out = exported["out"]
    names = sorted(p.name for p in out.iterdir())
    stem = "mobilenet_v2_w0.35_r32_int8"
    assert names == [f"{stem}.pt", f"{stem}.pt.json", f"{stem}.ptl", f"{stem}.ptl.json"]  # no temp files left
    arts = exported["report"]["artifacts"]
    assert arts["pt"]["bytes"] == (out / f"{stem}.pt").stat().st_size > 10_000
    side = json.loads((out / f"{stem}.ptl.json").read_text())
    assert side["engine"] == "qnnpack" and side["relu6"] == "clamp" and side["granularity"]["granularity"] == "per-channel"
    assert side["model"]["name"] == "mobilenet_v2" and side["config"] == CFG.to_dict() and "torch" in side["versions"]


def test_reloaded_artifacts_agree_with_the_int8_model(exported):
    rep = exported["report"]
    for kind in ("pt", "ptl"):
        assert rep["parity"][kind]["images"] == 100 and rep["parity"][kind]["process"] == "fresh"
        assert rep["parity"][kind]["agreement"] >= 99.0 and rep["parity"][kind]["max_abs_logit_diff"] < 1e-3
    assert "lite interpreter" in rep["parity"]["ptl"]["runtime"]


def test_report_is_complete_and_serialisable(exported):
    rep = exported["report"]
    json.dumps(rep)
    acc = rep["accuracy"]
    assert acc["images"] == 100 and 0 <= acc["int8_top1"] <= 100
    assert acc["top1_drop_pp"] == pytest.approx(acc["float_top1"] - acc["int8_top1"], abs=1e-3)
    assert acc["agreement_float_vs_int8"] >= 80
    assert (rep["engine"], rep["granularity"], rep["relu6"], rep["script_method"]) == ("qnnpack", "per-channel", "clamp", "script")
    assert rep["latency"]["threads"] == 1 and rep["latency"]["median_ms"] > 0
    assert rep["calibration"]["samples"] == 40


def test_optimize_for_mobile_failure_is_reported_not_skipped(exported):
    warns = [w for w in exported["report"]["warnings"] if "optimize_for_mobile" in w]
    assert len(warns) == 1 and "XNNPACK" in warns[0]
    sm = torch.jit.load(exported["report"]["artifacts"]["pt"]["path"])
    module, warning = ts.try_optimize_for_mobile(sm)
    assert module is sm and "XNNPACK is not enabled" in warning


def test_reload_outputs_chunks_and_matches_in_process(exported, monkeypatch):
    rep, info = exported["report"], exported["info"]
    x = torch.stack([exported["eval_set"][i][0] for i in range(0, 100, 3)])  # 34 real images
    with eager.quantized_engine("qnnpack"):  # weights are packed for the engine current at load time
        ref = torch.jit.load(rep["artifacts"]["pt"]["path"])(x)
    monkeypatch.setattr(ts, "RELOAD_CHUNK", 10)  # 4 input files in one fresh process
    got = ts.reload_outputs(rep["artifacts"]["ptl"]["path"], x, lite=True, engine="qnnpack")
    assert got.shape == (34, info.num_classes) and torch.equal(got, ref)


def test_reload_failures_carry_the_subprocess_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(VerificationError, match="failed in a fresh process \\(torch.jit.load, engine qnnpack.*\n"):
        ts.reload_outputs(bad, torch.zeros(1, 3, RES, RES), lite=False, engine="qnnpack")
    with pytest.raises(VerificationError, match="does not exist"):
        ts.reload_outputs(tmp_path / "missing.ptl", torch.zeros(1, 3, RES, RES), lite=True, engine="qnnpack")


def test_a_failed_write_leaves_no_file(tmp_path):
    class Broken:
        def save(self, path):
            open(path, "wb").write(b"partial")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ts.write_pt(Broken(), tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_given_int8_model_must_match_the_target_engine(exported):
    ex = exported
    x86 = eager.quantize_eager(ex["model"], ex["calib"], CFG, engine="x86")
    with pytest.raises(ExportError, match="quantized for engine 'x86', not 'qnnpack'"):
        ts.export_torchscript(ex["model"], ex["info"], None, ex["eval_set"], ex["out"] / "x", config=CFG, qmodel=x86)
