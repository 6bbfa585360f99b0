"""The one road end to end on shipped checkpoints and real Fashion-MNIST images (regressions vs baselines)."""
import json
from pathlib import Path

import pytest
import torch

from mbquant import calibrate, checkpoints
from mbquant.cli import main
from mbquant.config import QuantConfig, RunConfig
from mbquant.data.contract import spec_of
from mbquant.data.dataset import load_folder
from mbquant.errors import ConfigError
from mbquant.mobile.xnnpack import PteModel
from mbquant.models import resolve_model
from mbquant.pipeline import quantize
from mbquant.records import Sidecar
from mbquant.train import evaluate_float



@pytest.mark.parametrize("name", checkpoints.shipped_names())
def test_shipped_checkpoint_files_are_the_recorded_ones(name):
    from mbquant.models import file_sha256

    entry = checkpoints.manifest()["checkpoints"][name]
    path = checkpoints.resolve_shipped(name)
    assert path.stat().st_size == entry["bytes"] and file_sha256(path) == entry["sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("name", checkpoints.shipped_names())
def test_shipped_checkpoint_reproduces_its_recorded_accuracy(fmnist, name):
    entry = checkpoints.manifest()["checkpoints"][name]
    model, info = resolve_model(entry["model"], name)
    assert (info.width_mult, info.resolution) == (entry["width_mult"], entry["resolution"])
    res = evaluate_float(model, load_folder(fmnist / "val", spec_of(info.preset), expected_classes=info.classes))
    assert res.count == 10000
    assert abs(res.top1("model") - entry["val_top1"]) <= 0.1


def test_defaults_point_at_shipped_checkpoints():
    m = checkpoints.manifest()
    for model, name in m["defaults"].items():
        assert checkpoints.resolve_shipped(name).exists() and m["checkpoints"][name]["model"] == model
    # each file at most 10 MB (the width-1.0 reference is 9 MB of fp32 weights); all of them in the package < 20 MiB
    assert max(e["bytes"] for e in m["checkpoints"].values()) <= 10 * 10 ** 6
    assert sum(e["bytes"] for e in m["checkpoints"].values()) < 20 * 2 ** 20


def test_phone_ptq_structure_and_artifacts(phone_run):
    out, rep = phone_run
    b, (art,) = rep["backends"]["pte-xnnpack"], rep["artifacts"]
    assert rep["status"] == "ok" and b["calibration"]["samples"] == 512 and art["images"] == 2000
    assert b["config"]["observer"] == "percentile" and b["config"]["bias_correction"] and b["config"]["fuse_relu6"]
    assert b["batch_norm"] == 0 and b["fused_conv_relu6"] == 35 and b["bias_correction"]["layers_corrected"] == 53
    assert b["kept_float"] == b["float_layers"] == ["classifier.1"]          # only the classifier, by the recipe
    assert art["delegated"] == 1.0 and art["details"]["delegation"]["delegate_calls"] == 1
    # the only fp32 inside the delegate is the logits layer the recipe keeps in float; the report says so
    assert art["details"]["delegation"]["float_islands"] == {"linear": {"islands": 1, "fp32_values_per_image": 10}}
    assert any("float islands (converted to fp32 and back): 1 x linear" in line for line in art["summary"])
    assert art["bytes"] < rep["float"]["bytes"] / 3
    assert art["latency"]["median_ms"] > 0 and rep["float"]["latency"]["median_ms"] > 0
    worst = b["layer_sqnr_worst5"]
    assert len(worst) == 5 and all(r["sqnr_db"] > 10 for r in worst) and len(b["layer_sqnr_all"]) >= 52
    for key in ("torch", "executorch", "torchao", "mbquant"):
        assert key in rep["versions"]
    assert set(b["seconds"]) >= {"export", "prepare", "calibrate", "convert", "bias_correction", "write"}
    files = sorted(p.name for p in out.iterdir())
    assert files == ["mobilenet_v2_w0.5_r64_fp32.pte", "mobilenet_v2_w0.5_r64_int8.pte",
                     "mobilenet_v2_w0.5_r64_int8.pte.json", "report.json"]
    sidecar = Sidecar.of(out / "mobilenet_v2_w0.5_r64_int8.pte")
    assert sidecar.config["granularity"] == "per-channel" and sidecar.calibration_digest
    assert sidecar.measured["top1"] == art["top1"] and sidecar.input_shape == (1, 3, 64, 64)
    assert sidecar.sha256 == art["sha256"] and sidecar.preprocess == spec_of(sidecar.model.preset)
    assert PteModel(out / "mobilenet_v2_w0.5_r64_int8.pte")(torch.zeros(3, 3, 64, 64)).shape == (3, 10)


def test_report_config_round_trips_through_from_dict(phone_run):
    _, rep = phone_run
    assert QuantConfig.from_dict(rep["config"]) == QuantConfig()
    assert RunConfig.from_dict(rep["run"]) == RunConfig(latency_runs=5, eval_limit=2000, target=None)
    assert QuantConfig.from_dict(rep["backends"]["pte-xnnpack"]["config"]).keep_float == ("logits",)


def test_parity_flips_are_near_ties(phone_run):
    """XNNPACK's integer kernels round differently from PT2E's simulation: images whose top-1 flips between the
    .pte and the INT8 module are those the module itself barely decides (small top-2 margin)."""
    _, rep = phone_run
    flips = rep["artifacts"][0]["parity"]["flips"]
    if flips["count"]:
        assert flips["margin_max"] < flips["margin_median_all"] / 4 and flips["margin_max_percentile"] < 10


def test_quantize_honours_num_calib_and_seed(fmnist):
    model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
    cfg = QuantConfig(num_calib=24, seed=5, bias_correction=False, batch_size=8)
    q = quantize(model, fmnist / "train", info=info, config=cfg)
    assert q.calibration.samples == 24 and q.calibration.batches == 3 and q.config.observer == "percentile"
    with pytest.raises(ConfigError, match="holds 24 samples drawn with seed 5, but the config asks for "
                                          "num_calib=512, seed=0"):
        quantize(model, calibrate.from_folder(fmnist / "train", spec_of(info.preset), 24, seed=5), info=info)


def test_small_width_phone_run(flow_runs):
    """The width-0.35 checkpoint with the default recipe; on AVX-512 VNNI hosts its .pte once failed a fixed 99 %
    parity gate while agreeing with the float model better than the INT8 module did (issue 9)."""
    _, rep = flow_runs.get("mobilenet_v2_w0.35_r64_fmnist.ptq-phone")
    (art,) = rep["artifacts"]
    assert art["images"] == 2000 and rep["backends"]["pte-xnnpack"]["calibration"]["samples"] == 512
    assert rep["backends"]["pte-xnnpack"]["bias_correction"]["layers_corrected"] == 53
    assert rep["float"]["file"] is None and art["delegated"] == 1.0
    assert rep["command"].startswith("mbquant ptq mobilenet_v2 --weights mobilenet_v2_w0.35_r64_fmnist")


@pytest.mark.slow
def test_phone_ptq_full_val_meets_the_issue_targets(flow_runs, fmnist, tmp_path):
    """The default `mbquant ptq` on the phone checkpoint, 512 calibration images from train, all 10,000 val images:
    drop <= 0.1 pp and float~.pte agreement >= 99.3 % (issues 3 and 9); TorchScript drop <= 0.5 pp."""
    from mbquant.mobile.bundle import write_bundle
    from mbquant.mobile.xnnpack.client import host_runner, run_bundle

    out, rep = flow_runs.get("mobilenet_v2_w0.5_r64_fmnist.ptq-phone", 10000)
    (pte,) = rep["artifacts"]
    assert pte["images"] == 10000 and pte["drop_pp"] <= 0.1 and pte["agreement_float"] >= 99.3
    _, ts = flow_runs.get("mobilenet_v2_w0.5_r64_fmnist.torchscript", 10000)
    assert [a["drop_pp"] <= 0.5 and a["images"] == 10000 for a in ts["artifacts"]] == [True, True]
    # issue 12: the torch-free client (bundle's own preprocessing, the C++ runtime) reproduces the report's top-1
    res = run_bundle(write_bundle(out, tmp_path / "bundle"), fmnist / "val", host_runner())
    assert res["images"] == 10000 and res["top1"] == pte["top1"]   # the same contract, the same program


@pytest.mark.parametrize("images", [2000, pytest.param(10000, marks=pytest.mark.slow)])
def test_mcu_program_of_the_shipped_v1_fits_300kb_flash_and_64kb_ram(flow_runs, images):
    """The shipped MobileNetV1 0.25 at 96x96 as a Cortex-M4 program with an int8 input (issue 11's budget); its
    accuracy is checked against tests/baselines."""
    out, rep = flow_runs.get("mobilenet_v1_w0.25_r96_fmnist.ptq-mcu", images)
    (art,) = rep["artifacts"]
    mem = art["details"]["memory"]
    assert mem["flash"]["program_bytes"] <= 300 * 1024 and mem["ram"]["arena_bytes"] <= 64 * 1024
    assert art["details"]["non_int8_ops"] == [] and (out / "mobilenet_v1_w0.25_r96_int8_pte.h").exists()
    assert art["images"] == images and art["drop_pp"] <= 0.5
