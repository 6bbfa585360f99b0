"""The command line: usage errors, bad input (clear message, non-zero exit, no .pte left), train/eval round trip."""
import json
import re
from pathlib import Path

import pytest

from mbquant.cli import main
from mbquant.config import RunConfig
from mbquant.pipeline import gate_failures
from mbquant.records import ArtifactResult
from tests.conftest import copy_subset


def _no_pte(root: Path) -> bool:
    return not list(Path(root).rglob("*.pte")) and not list(Path(root).rglob(".*.tmp"))


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "mbquant 0.1.0" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["ptq", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--num-calib" in out and "--max-drop" in out and "--no-fuse-relu6" in out
    assert "--keep-float" in out and "--recipe" in out


def test_help_of_every_command_imports_no_torch():
    """Start-up stays fast: parsing (and --help) imports neither torch nor the ExecuTorch stack."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom mbquant.cli import COMMANDS, main\n"
            "for argv in [['--help']] + [c.split() + ['--help'] for c in COMMANDS] + [['baseline', 'write', '--help']]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "print(sorted(m for m in ('torch', 'executorch', 'torchao', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_then_eval_reproduces_the_checkpoint_accuracy(tiny_ckpt, capsys):
    from mbquant.models import read_checkpoint_info

    root, ck = tiny_ckpt
    info = read_checkpoint_info(ck)
    assert info["model"] == "mobilenet_v1" and info["resolution"] == 32 and info["preset"]["kind"] == "small"
    assert info["recipe"]["train"]["seed"] == 0 and len(info["classes"]) == 10
    capsys.readouterr()
    assert main(["eval", "mobilenet_v1", "--weights", str(ck), "--data", str(root / "val"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 100 and res["top1"] == info["metrics"]["final_val_top1"]
    assert res["params"] > 0 and res["macs"] > 0


def _ptq(ck, calib, out, *extra):
    return main(["ptq", "mobilenet_v1", "--weights", str(ck), "--calib", str(calib), "--out", str(out),
                 "--quiet", *extra])


def test_ptq_bad_inputs_fail_cleanly(tiny_ckpt, tmp_path, capsys):
    root, ck = tiny_ckpt
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "missing")], 1, "image folder '.*missing' does not exist"),
        ([str(tmp_path / "empty")], 1, "has no images"),
        ([str(root / "train"), "--num-calib", "0"], 2, r"num_calib \(calibration samples\) 0 is out of range"),
        ([str(root / "train"), "--observer", "kl"], 2, "invalid choice"),
        ([str(root / "train"), "--format", "pte,tflite"], 2, "format 'tflite' is not supported on target 'phone'; "
                                                            "supported: ([a-z-]+, )*pte, ([a-z-]+, )*torchscript"),
        ([str(root / "train"), "--format", "pte,pte"], 2, r"must name each artifact format once"),
        ([str(root / "train"), "--target", "x86"], 2, "format 'pte' is not supported on target 'x86'; supported: ([a-z-]+, )*torchscript"),
        ([str(root / "train"), "--target", "mcu9"], 2, "target 'mcu9' is not supported; supported: mcu, phone, x86"),
        ([str(root / "train"), "--keep-float", "classifier.7"], 2, r"'classifier.7' is not a layer of MobileNetV1"),
        ([str(root / "train"), "--format", "torchscript", "--bias-correction"], 2,
         "--bias-correction is not supported by backend 'ts-qnnpack'"),
        ([str(root / "train"), "--max-drop", "nan"], 2, r"--max-drop nan is not a finite number; pass a number"),
        ([str(root / "train"), "--threads", "0"], 2, "--threads 0 is invalid"),
    ]
    for args, code, pattern in cases:
        calib, *extra = args
        if pattern == "invalid choice":
            with pytest.raises(SystemExit) as e:
                _ptq(ck, calib, out, *extra)
            assert e.value.code == 2
        else:
            assert _ptq(ck, calib, out, *extra) == code
        assert re.search(pattern, capsys.readouterr().err), pattern
        assert _no_pte(tmp_path)


def test_ptq_class_count_disagrees_with_checkpoint(tiny_ckpt, tmp_path, capsys):
    root, ck = tiny_ckpt
    three = copy_subset(root / "train", tmp_path / "three", 4, classes=["bag", "coat", "dress"])
    assert _ptq(ck, three, tmp_path / "out") == 1
    assert re.search(r"calibration folder '.*three' has 3 classes but the model has 10", capsys.readouterr().err)
    assert _ptq(ck, root / "train", tmp_path / "out", "--eval", str(three)) == 1
    assert re.search(r"folder '.*three' has 3 classes .* the model has 10 classes", capsys.readouterr().err)
    assert _no_pte(tmp_path)


def test_ptq_all_corrupt_calibration_images(tiny_ckpt, tmp_path, capsys):
    _, ck = tiny_ckpt
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.png").write_bytes(b"not an image")  # a flat (unlabelled) calibration folder
    assert _ptq(ck, tmp_path / "bad", tmp_path / "out", "--eval", str(tiny_ckpt[0] / "val")) != 0
    assert re.search(r"no readable calibration images in '.*bad' \(3 unreadable; first: 0.png: Unidentified",
                     capsys.readouterr().err)
    assert _no_pte(tmp_path)


def test_ptq_unwritable_out(tiny_ckpt, tmp_path, capsys):
    root, ck = tiny_ckpt
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert _ptq(ck, root / "train", blocker / "out") == 1
    assert re.search(r"cannot create folder of --out '.*file': it exists and is a file", capsys.readouterr().err)
    assert _no_pte(tmp_path)


def test_unknown_model_exit_code(capsys):
    assert main(["eval", "mobilenet_v9", "--data", "x"]) == 2
    assert "unknown model 'mobilenet_v9'" in capsys.readouterr().err


def _result(**changes) -> ArtifactResult:
    def paired(only_a, only_b, n=1000):
        from mbquant.stats import PairedDifference

        return PairedDifference(n, only_a, only_b).to_dict()

    base = dict(backend="pte-xnnpack", file="m.pte", bytes=1, runtime="rt", images=1000, top1=90.0,
                top5=99.0, drop_pp=0.4, agreement_float=99.0, reference_top1=90.0, reference_agreement_float=99.0,
                parity={"agreement": 99.5, "top1_reference_minus_artifact": paired(3, 2),
                        "agreement_float_reference_minus_artifact": paired(2, 3)},
                delegated=1.0, details={"delegation": {"ops_outside_delegate": {"aten.view_copy": 1}}})
    return ArtifactResult(**{**base, **changes})


def test_gates_apply_to_every_result_in_one_place():
    """The run's gates, then each artifact's backend's own (here the phone backend's delegation gate)."""
    from mbquant.mobile import table

    run = RunConfig(options={"min_delegated": 0.99}, max_drop=0.5)
    backends = {"pte-xnnpack": table.load("pte-xnnpack", run)}
    assert gate_failures([_result(), _result(file="m.pt", delegated=None)], run, backends) == []
    fails = gate_failures([_result(delegated=0.9, drop_pp=0.6)], run, backends)
    assert len(fails) == 2 and "larger than --max-drop 0.5" in fails[0]
    assert "only 90.00% of ops run in the XNNPACK delegate" in fails[1] and "aten.view_copy" in fails[1]
    assert gate_failures([_result(drop_pp=5.0)], RunConfig()) == []  # no --max-drop: the drop is reported, not gated


def test_parity_gate_tolerates_rounding_flips_and_catches_a_worse_artifact():
    from mbquant.stats import PairedDifference

    run = RunConfig()
    # 25 images flip each way: noise, whatever the host's kernels (parity 95 %, no default floor)
    noisy = {"agreement": 95.0, "top1_reference_minus_artifact": PairedDifference(1000, 25, 25).to_dict(),
             "agreement_float_reference_minus_artifact": PairedDifference(1000, 20, 24).to_dict()}
    assert gate_failures([_result(parity=noisy)], run) == []
    # the artifact loses 40 images more than it wins: not what was quantized
    worse = {**noisy, "top1_reference_minus_artifact": PairedDifference(1000, 50, 10).to_dict()}
    (fail,) = gate_failures([_result(parity=worse)], run)
    assert "top-1 accuracy is 4.00 pp below that of the INT8 model it was written from (50 vs 10 images" in fail
    assert len(gate_failures([_result(parity=noisy)], RunConfig(min_parity=99.0))) == 1   # an explicit floor


def test_clustered_standard_error_widens_for_flips_that_move_together_and_not_for_a_broken_artifact():
    """Near-tie flips between the same two classes move together (one logit offset between kernel families): the
    cluster-robust SE of the paired difference grows with them; with flips spread over many class pairs it equals
    the paired (McNemar/Wald) SE, so an artifact that loses everywhere still fails the gate."""
    import numpy as np

    from mbquant.stats import PairedDifference, clustered_se_pp

    n = 10000
    labels = np.arange(n) % 10
    ref = labels.copy()
    art = labels.copy()
    # 10 images the reference misses, each in its own class pair; 30 the artifact misses, all taken for class 2
    j = np.arange(10)
    ref_wrong = 7000 + 10 * j + j                                       # labels 0..9
    ref[ref_wrong] = (labels[ref_wrong] + 4) % 10
    art_wrong = 6 + 10 * np.arange(30)                                  # label 6
    art[art_wrong] = 2
    a, b = ref == labels, art == labels
    wald = PairedDifference(n, int((a & ~b).sum()), int((b & ~a).sum())).se_pp
    clustered = clustered_se_pp(a, b, ref, art)
    assert clustered > 2 * wald                                         # 30 flips in one pair move together
    i = np.arange(30)
    spread_wrong = 5000 + 10 * i + i % 10                               # the same losses, each in its own pair
    spread = labels.copy()
    spread[spread_wrong] = (labels[spread_wrong] + 1 + i // 10) % 10
    c = spread == labels
    assert clustered_se_pp(a, c, ref, spread) == pytest.approx(
        PairedDifference(n, int((a & ~c).sum()), int((c & ~a).sum())).se_pp, rel=1e-6)
    singles = clustered_se_pp(np.array([1, 0, 0, 1], bool), np.array([0, 1, 0, 1], bool), np.array([0, 1, 2, 3]),
                              np.array([4, 5, 2, 3]))
    assert singles == pytest.approx(PairedDifference(4, 1, 1).se_pp)  # one image per pair: the paired SE
    run = RunConfig()
    broken = {"agreement": 95.0, "top1_reference_minus_artifact": {**PairedDifference(1000, 50, 10).to_dict(),
                                                                   "se_clustered_pp": 0.9},
              "agreement_float_reference_minus_artifact": PairedDifference(1000, 20, 24).to_dict()}
    (fail,) = gate_failures([_result(parity=broken)], run)              # 4.0 pp > 3 x 0.9 pp
    assert "more than --parity-z 3.0 standard errors of 0.90 pp, flips grouped by class pair" in fail
    near_ties = {**broken, "top1_reference_minus_artifact": {**PairedDifference(10000, 58, 29).to_dict(),
                                                             "se_clustered_pp": 0.13}}
    assert gate_failures([_result(parity=near_ties)], run) == []      # 0.29 pp < 3 x 0.13 pp


@pytest.mark.slow   # make test: pte + onnx in one run (tests/mobile/onnx), torchscript's own files (mobile/torchscript)
def test_ptq_writes_and_verifies_both_formats_in_one_run(tiny_ckpt, tmp_path, capsys):
    root, ck = tiny_ckpt
    out = tmp_path / "out"
    rc = main(["ptq", "mobilenet_v1", "--weights", str(ck), "--calib", str(root / "train"), "--eval", str(root / "val"),
               "--num-calib", "32", "--format", "pte,torchscript", "--no-float-program", "--latency-runs", "2",
               "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    stem = "mobilenet_v1_w0.25_r32_int8"
    assert names == sorted([f"{stem}.pte", f"{stem}.pte.json", f"{stem}.pt", f"{stem}.pt.json", f"{stem}.ptl",
                            f"{stem}.ptl.json", "report.json"])
    rep = json.loads((out / "report.json").read_text())
    ts = rep["backends"]["ts-qnnpack"]
    assert ts["engine"] == "qnnpack" and ts["weights"]["granularity"] == "per-channel" and ts["relu6"] == "fused (clamp)"
    assert [a["images"] for a in rep["artifacts"]] == [100, 100, 100]
    assert all(a["parity"]["agreement"] >= 99 for a in rep["artifacts"] if a["backend"] == "ts-qnnpack")
    assert any("optimize_for_mobile" in n for n in rep["notes"])  # said, not silently skipped
    assert any("deprecated upstream" in w for w in rep["warnings"])  # the one line that asks the user to act
