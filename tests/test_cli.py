"""The command line: usage errors, bad input (clear message, non-zero exit, no .pte left), train/eval round trip."""
import json
import re
from pathlib import Path

import pytest

from mbquant.cli import main
from mbquant.config import RunConfig
from mbquant.pipeline import gate_failures
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


def test_train_then_eval_reproduces_the_checkpoint_accuracy(tiny_ckpt, capsys):
    from mbquant.models import read_checkpoint_info

    root, ck = tiny_ckpt
    info = read_checkpoint_info(ck)
    assert info["model"] == "mobilenet_v1" and info["resolution"] == 32 and info["preset"]["kind"] == "small"
    assert info["recipe"]["train"]["seed"] == 0 and len(info["classes"]) == 10
    capsys.readouterr()
    assert main(["eval", "mobilenet_v1", "--weights", str(ck), "--data", str(root / "val"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 100 and res["top1"] == info["metrics"]["history"][-1]["val_top1"]
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
        ([str(root / "train"), "--num-calib", "0"], 2, "num_calib must be a positive number of samples, got 0"),
        ([str(root / "train"), "--observer", "kl"], 2, "invalid choice"),
        ([str(root / "train"), "--format", "pte,onnx"], 2, "format 'onnx' is not supported; choose one of: pte, torchscript"),
        ([str(root / "train"), "--format", "pte,pte"], 2, r"must name each artifact format once"),
        ([str(root / "train"), "--target", "x86"], 2, "format 'pte' is not supported on target 'x86'; supported: torchscript"),
        ([str(root / "train"), "--target", "mcu9"], 2, "target 'mcu9' is not supported; supported: phone, x86"),
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
    assert re.search(r"folder '.*three' has 3 classes .* trained on 10 classes", capsys.readouterr().err)
    assert _no_pte(tmp_path)


def test_ptq_all_corrupt_calibration_images(tiny_ckpt, tmp_path, capsys):
    _, ck = tiny_ckpt
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.png").write_bytes(b"not an image")  # a flat (unlabelled) calibration folder
    assert _ptq(ck, tmp_path / "bad", tmp_path / "out", "--eval", str(tiny_ckpt[0] / "val")) != 0
    assert re.search(r"no readable calibration images in '.*bad' \(3 unreadable\)", capsys.readouterr().err)
    assert _no_pte(tmp_path)


def test_ptq_unwritable_out(tiny_ckpt, tmp_path, capsys):
    root, ck = tiny_ckpt
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert _ptq(ck, root / "train", blocker / "out") == 1
    assert re.search(r"cannot create output folder '.*file/out'", capsys.readouterr().err)
    assert _no_pte(tmp_path)


def test_unknown_model_exit_code(capsys):
    assert main(["eval", "mobilenet_v9", "--data", "x"]) == 2
    assert "unknown model 'mobilenet_v9'" in capsys.readouterr().err


def test_gates():
    run = RunConfig(min_delegated=0.99, max_drop=0.5, min_parity=99.0)
    assert gate_failures(run, delegated=1.0, parity=100.0, drop=0.4, outside={}) == []
    fails = gate_failures(run, delegated=0.9, parity=98.0, drop=0.6, outside={"aten.view_copy": 1})
    assert len(fails) == 3
    assert "only 90.00% of INT8 ops are delegated" in fails[0] and "aten.view_copy" in fails[0]
    assert "--min-parity 99.0" in fails[1] and "larger than --max-drop 0.5" in fails[2]
    assert gate_failures(RunConfig(), delegated=1.0, parity=100.0, drop=5.0, outside={}) == []  # no --max-drop


def test_ptq_writes_and_verifies_both_formats_in_one_run(tiny_ckpt, tmp_path, capsys):
    root, ck = tiny_ckpt
    out = tmp_path / "out"
    rc = main(["ptq", "mobilenet_v1", "--weights", str(ck), "--calib", str(root / "train"), "--eval", str(root / "val"),
               "--num-calib", "32", "--format", "pte,torchscript", "--no-float-program", "--latency-runs", "2",
               "--min-parity", "0", "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    stem = "mobilenet_v1_w0.25_r32_int8"
    assert names == sorted([f"{stem}.pte", f"{stem}.pte.json", f"{stem}.pt", f"{stem}.pt.json", f"{stem}.ptl",
                            f"{stem}.ptl.json", "report.json"])
    rep = json.loads((out / "report.json").read_text())
    ts = rep["torchscript"]
    assert ts["engine"] == "qnnpack" and ts["granularity"] == "per-channel" and ts["relu6"] == "clamp"
    assert ts["accuracy"]["images"] == rep["accuracy"]["images"] == 100
    assert ts["parity"]["pt"]["agreement"] >= 99 and ts["parity"]["ptl"]["agreement"] >= 99
    assert any("optimize_for_mobile" in w for w in rep["warnings"])  # said, not silently skipped
