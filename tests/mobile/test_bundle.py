"""App bundles: written from verified runs only (the verified file itself, checked again in staging before anything
is published), checked when read (manifest, sha256, contract, labels, program), and a torch-free client that
reproduces the report's accuracy from the bundle alone."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from mbquant.cli import main
from mbquant.errors import ConfigError, DataError, VerificationError
from mbquant.mobile.bundle import open_bundle, read_bundle, write_bundle
from mbquant.records import RecordError, paths
from tests.conftest import needs

pytestmark = pytest.mark.usefixtures("one_thread")
FILES = ("model.pte", "model.pte.json", "labels.txt", "preprocess.json", "report.json", "bundle.json", "README.md")


def test_ptq_writes_a_bundle_with_the_contract(tiny_run):
    root, out, bundle = tiny_run
    assert sorted(p.name for p in bundle.iterdir()) == sorted(FILES)
    b, pred = open_bundle(bundle)
    pred.close()
    assert b.spec.shape == [1, 3, 32, 32] and b.spec.color == "grayscale" and b.manifest.backend == "pte-xnnpack"
    assert b.labels == sorted(p.name for p in (root / "val").iterdir()) and len(b.labels) == 10
    assert (bundle / "model.pte").read_bytes() == (out / "mobilenet_v1_w0.25_r32_int8.pte").read_bytes()
    assert b.manifest.files["model.pte"] == hashlib.sha256((bundle / "model.pte").read_bytes()).hexdigest()
    assert "mean" in (bundle / "README.md").read_text()


def test_the_torch_free_client_reproduces_the_reports_accuracy(tiny_run):
    """The client (numpy + Pillow + the C++ runtime) with torch made unimportable gets the report's top-1 exactly."""
    from mbquant.mobile.xnnpack.client import host_runner

    needs("the host runner", host_runner().binary.is_file(), "run `make arm`")
    root, out, bundle = tiny_run
    code = ("import sys; sys.modules['torch'] = None\n"
            "from mbquant.mobile.xnnpack.client import main\n"
            f"sys.exit(main([{str(bundle)!r}, {str(root / 'val')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1500:]
    got = json.loads(proc.stdout)
    art = json.loads((out / "report.json").read_text())["artifacts"][0]
    assert got["images"] == art["images"] == 100 and got["top1"] == art["top1"]


def _copy(bundle, tmp_path):
    broken = tmp_path / "b"
    shutil.copytree(bundle, broken)
    return broken


def _rehash(root):
    """Rewrite the manifest's digests as if the bundle had been written so (to reach the checks behind them)."""
    m = json.loads((root / paths.BUNDLE_MANIFEST).read_text())
    m["files"] = {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in m["files"]}
    (root / paths.BUNDLE_MANIFEST).write_text(json.dumps(m))


def test_bundles_are_checked_when_read(tiny_run, tmp_path):
    _, _, bundle = tiny_run
    broken = _copy(bundle, tmp_path)
    (broken / "labels.txt").unlink()
    with pytest.raises(VerificationError, match="lacks labels.txt; write it again with `mbquant bundle"):
        read_bundle(broken)
    shutil.copy(bundle / "labels.txt", broken)
    (broken / "labels.txt").write_text("".join(f"{c}\n" for c in (bundle / "labels.txt").read_text().split()[:9]))
    with pytest.raises(VerificationError, match="labels.txt is not the file the bundle was written with"):
        read_bundle(broken)
    _rehash(broken)
    with pytest.raises(RecordError, match="hold 9 class names but the model has 10 outputs"):
        read_bundle(broken)
    shutil.copy(bundle / "labels.txt", broken)
    spec = json.loads((bundle / "preprocess.json").read_text())
    (broken / "preprocess.json").write_text(json.dumps({**spec, "input": {**spec["input"], "shape": [1, 3, 64, 64]}}))
    _rehash(broken)
    with pytest.raises(VerificationError, match=r"the manifest says input \[1, 3, 32, 32\], preprocess.json "
                                                r"\[1, 3, 64, 64\]"):
        read_bundle(broken)
    (broken / "preprocess.json").write_text("{not json")
    _rehash(broken)
    with pytest.raises(RecordError, match="preprocessing contract '.*preprocess.json' is not valid JSON"):
        read_bundle(broken)
    (broken / "preprocess.json").write_text(json.dumps({**spec, "mean": [float("nan")] * 3}).replace("NaN", "NaN"))
    _rehash(broken)
    with pytest.raises(RecordError, match="is not valid JSON .*NaN is not a JSON number"):
        read_bundle(broken)
    shutil.copy(bundle / "preprocess.json", broken)
    (broken / "model.pte").write_bytes(b"not a program at all")
    _rehash(broken)
    read_bundle(broken)                                   # the records agree; the program itself is not one
    with pytest.raises(VerificationError, match="is not readable|could not load"):
        open_bundle(broken)


def test_only_verified_runs_of_bundle_backends_are_bundled(tiny_run, tmp_path):
    _, out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    rep = json.loads((run / "report.json").read_text())
    (run / "report.json").write_text(json.dumps({**rep, "status": "failed", "failures": ["a gate"]}))
    with pytest.raises(VerificationError, match="failed its checks"):
        write_bundle(run, tmp_path / "b")
    (run / "report.json").write_text(json.dumps({**rep, "artifacts": [{**a, "backend": "ts-qnnpack"}
                                                                      for a in rep["artifacts"]]}))
    with pytest.raises(ConfigError, match="has no artifact an app bundle can carry"):
        write_bundle(run, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_replaced_or_damaged_program_is_never_bundled_and_a_good_bundle_stays(tiny_run, tmp_path):
    """The run's .pte swapped for another file (the fp32 program, a truncated one) after the run: refused before
    anything is written, and an earlier good bundle in --out is left exactly as it was."""
    _, out, bundle = tiny_run
    run, good = tmp_path / "run", tmp_path / "good"
    shutil.copytree(out, run)
    shutil.copytree(bundle, good)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    pte = run / "mobilenet_v1_w0.25_r32_int8.pte"
    pte.write_bytes(pte.read_bytes()[:2000])
    assert main(["bundle", str(run), "--out", str(good), "--overwrite", "--quiet"]) == 1
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    with pytest.raises(VerificationError, match="is not the file the run verified"):
        write_bundle(run, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_bundle_overwrites_only_a_bundle(tiny_run, tmp_path, capsys):
    _, out, _ = tiny_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own")
    assert main(["bundle", str(out), "--out", str(mine), "--overwrite"]) == 2
    assert "is not an earlier mbquant bundle" in capsys.readouterr().err and (mine / "notes.txt").exists()
    with pytest.raises(DataError):
        read_bundle(tmp_path / "nowhere")
