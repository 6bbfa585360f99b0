"""App bundles: written from verified runs only, checked when read, and a torch-free client that reproduces the
report's accuracy from the bundle alone."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from mbquant.cli import main
from mbquant.errors import ConfigError, VerificationError
from mbquant.mobile.bundle import FILES, read_bundle, write_bundle
from mbquant.mobile.client import host_runner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tiny_ckpt, tmp_path_factory):
    """A verified run of the tiny model evaluated on every image of its val folder (100)."""
    root, ck = tiny_ckpt
    out = tmp_path_factory.mktemp("tinyrun") / "run"
    assert main(["ptq", "mobilenet_v1", "--weights", str(ck), "--calib", str(root / "train"), "--eval",
                 str(root / "val"), "--num-calib", "32", "--no-float-program", "--latency-runs", "1",
                 "--out", str(out), "--bundle", str(out.parent / "bundle"), "--quiet"]) == 0
    return root, out, out.parent / "bundle"


def test_ptq_writes_a_bundle_with_the_contract(tiny_run):
    root, out, bundle = tiny_run
    assert sorted(p.name for p in bundle.iterdir()) == sorted(FILES)
    b = read_bundle(bundle, host_runner())
    assert b.spec["input"]["shape"] == [1, 3, 32, 32] and b.spec["color"]["mode"] == "grayscale"
    assert b.labels == sorted(p.name for p in (root / "val").iterdir()) and len(b.labels) == 10
    assert (bundle / "model.pte").read_bytes() == (out / "mobilenet_v1_w0.25_r32_int8.pte").read_bytes()
    assert "mean" in (bundle / "README.md").read_text()


def test_the_torch_free_client_reproduces_the_reports_accuracy(tiny_run):
    """The client (numpy + Pillow + the C++ runtime) with torch made unimportable gets the report's top-1 exactly."""
    root, out, bundle = tiny_run
    code = ("import sys; sys.modules['torch'] = None\n"
            "from mbquant.mobile.client import main\n"
            f"sys.exit(main([{str(bundle)!r}, {str(root / 'val')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1500:]
    got = json.loads(proc.stdout)
    art = json.loads((out / "report.json").read_text())["artifacts"][0]
    assert got["images"] == art["images"] == 100 and got["top1"] == art["top1"]


def test_bundles_are_checked_when_read(tiny_run, tmp_path):
    _, _, bundle = tiny_run
    broken = tmp_path / "b"
    shutil.copytree(bundle, broken)
    (broken / "labels.txt").unlink()
    with pytest.raises(VerificationError, match="lacks labels.txt; rebuild it with `mbquant bundle`"):
        read_bundle(broken)
    shutil.copy(bundle / "labels.txt", broken)
    spec = json.loads((bundle / "preprocess.json").read_text())
    (broken / "preprocess.json").write_text(json.dumps({**spec, "input": {**spec["input"], "shape": [1, 3, 64, 64]}}))
    with pytest.raises(VerificationError, match=r"model.pte takes input \[1, 3, 32, 32\] but preprocess.json says "
                                                r"\[1, 3, 64, 64\]"):
        read_bundle(broken, host_runner())
    (broken / "preprocess.json").write_text("{not json")
    with pytest.raises(VerificationError, match="preprocess.json '.*' is not readable JSON"):
        read_bundle(broken)
    (broken / "preprocess.json").write_text(json.dumps({**spec, "std": [0.3, 0, 0.3]}))
    with pytest.raises(VerificationError, match="std must be positive"):
        read_bundle(broken)
    (broken / "model.pte").write_bytes(b"not a program at all")
    shutil.copy(bundle / "preprocess.json", broken)
    with pytest.raises(VerificationError, match="model.pte is not an ExecuTorch program"):
        read_bundle(broken)


def test_only_verified_xnnpack_runs_are_bundled(tiny_run, tmp_path):
    _, out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    rep = json.loads((run / "report.json").read_text())
    (run / "report.json").write_text(json.dumps({**rep, "status": "failed", "failures": ["a gate"]}))
    with pytest.raises(VerificationError, match="failed its checks"):
        write_bundle(run, tmp_path / "b")
    (run / "report.json").write_text(json.dumps({**rep, "artifacts": [{**a, "backend": "ts-qnnpack"}
                                                                      for a in rep["artifacts"]]}))
    with pytest.raises(ConfigError, match="has no pte-xnnpack artifact"):
        write_bundle(run, tmp_path / "b")
    assert not (tmp_path / "b").exists()
