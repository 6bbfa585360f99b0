"""Every command that writes follows one rule, and every number is judged only when it can judge (issue 19).

Table-driven like tests/test_safety.py, command by command: an output never lands on, in or over an input of the
same command; --overwrite replaces only an earlier mbquant output of the same kind; outputs are published only
after they are verified; a sample too small or a chance-level float model is refused, not reported as a pass; every
message names the problem, the value and the fix, with no traceback. Then kill tests for `bundle`, `check --out`
and `baseline write`, as `ptq` has.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from mbquant.cli import main
from tests.conftest import stub_lowering
from tests.test_safety import snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny_ckpt, tiny_run, tmp_path_factory):
    """The tiny model, a verified run with its artifact, a bundle of it and a baseline: the inputs of every command."""
    root, ck = tiny_ckpt
    _, run, bundle = tiny_run
    base = tmp_path_factory.mktemp("world")
    (pte,) = run.glob("*_int8.pte")
    assert main(["baseline", "write", str(pte), "--data", str(root / "val"), "--float-weights", str(ck),
                 "--tolerance", "0.5", "--out", str(base / "baseline.json"), "--quiet"]) == 0
    return {"root": root, "ck": ck, "run": run, "pte": pte, "bundle": bundle, "baseline": base / "baseline.json"}


@dataclass
class Ctx:
    tmp: Path
    w: dict
    vars: dict = field(default_factory=dict)

    def fmt(self, s: str) -> list[str]:
        return s.format(tmp=self.tmp, **{k: str(v) for k, v in self.w.items()}, **self.vars).split()

    def copy(self, key: str) -> Path:
        """A private copy of one of the world's files or folders (the case may damage it)."""
        src, dst = self.w[key], self.tmp / f"own_{key}"
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
        if src.is_file() and Path(f"{src}.json").is_file():
            shutil.copy(f"{src}.json", f"{dst}.json")
        self.w = {**self.w, key: dst}
        return dst


@dataclass
class Case:
    id: str
    argv: str
    code: int
    message: str                                        # regex on stderr
    setup: Callable[[Ctx], None] = lambda c: None
    watch: tuple[str, ...] = ()                         # world keys (after setup) that must not change
    slow: bool = False                                  # quantizes and lowers before it can judge: make test-slow


def _eval(n: int) -> str:
    return f"--eval-limit {n}"


PTQ = "ptq mobilenet_v1 --weights {ck} --calib {root}/train --eval {root}/val --num-calib 16 --quiet"
CHECK = "check {pte} --data {root}/val --float-weights {ck}"


def _trunc(c: Ctx) -> None:
    pte = c.copy("run") / c.w["pte"].name
    pte.write_bytes(pte.read_bytes()[:3000])


def _fp32_swapped(c: Ctx) -> None:
    """The float program of the same model written over the run's INT8 one (a valid program, the wrong file)."""
    from mbquant.models import load_checkpoint
    from mbquant.mobile.xnnpack.lower import lower
    from mbquant.quant.export import FloatModel

    run = c.copy("run")
    model, info = load_checkpoint(c.w["ck"])
    (run / c.w["pte"].name).write_bytes(lower(FloatModel(model, info.resolution).graph, info.resolution).buffer)


def _random_init(c: Ctx) -> None:
    """A chance-level model: the tiny architecture with its initial weights, saved as an mbquant checkpoint."""
    from mbquant.models import load_checkpoint, save_checkpoint
    from mbquant.models.zoo import build

    _, info = load_checkpoint(c.w["ck"])
    torch.manual_seed(1)
    save_checkpoint(build("mobilenet_v1", num_classes=10, width_mult=0.25), info, c.tmp / "chance.pth")
    c.vars["chance"] = str(c.tmp / "chance.pth")


def _user_file(c: Ctx, name: str, text: str = "mine") -> None:
    (c.tmp / name).parent.mkdir(parents=True, exist_ok=True)
    (c.tmp / name).write_text(text)
    c.vars[name.replace("/", "_").replace(".", "_")] = str(c.tmp / name)


CASES = [
    # ---------------------------------------------------------------- outputs never land on inputs
    Case("ptq-out-is-calib", PTQ + " --out {root}/train --overwrite", 2,
         r"--out '.*train' is --calib '.*train'; a command never writes onto, into or over its own inputs",
         watch=("root",)),
    Case("ptq-out-holds-eval", PTQ + " --out {root} --overwrite", 2, r"--out '.*' holds --calib", watch=("root",)),
    Case("ptq-out-inside-calib", PTQ + " --out {root}/train/run", 2, r"--out '.*train/run' is inside --calib"),
    Case("ptq-out-is-bundle", PTQ + " --out {tmp}/x --bundle {tmp}/x", 2,
         r"--out '.*x' and --bundle '.*x' overlap; pass separate folders"),
    Case("ptq-out-empty", PTQ + " --out ''", 2, r"argument --out: an empty path"),
    Case("ptq-out-cwd", PTQ + " --out . --overwrite", 2, r"--out '.' is the current folder, which mbquant cannot "
                                                        r"replace"),
    Case("ptq-overwrite-user-folder", PTQ + " --out {tmp}/mine --overwrite", 2,
         r"--out '.*mine' exists and is not an earlier mbquant run \(it holds no report.json of mbquant's\)",
         lambda c: _user_file(c, "mine/notes.txt")),
    Case("check-out-is-artifact", CHECK + " --max-drop 5 --out {pte}", 2, r"--out '.*\.pte' is ARTIFACT",
         watch=("pte",)),
    Case("check-out-is-baseline", "check {pte} --data {root}/val --baseline {baseline} --out {baseline}", 2,
         r"--out '.*baseline.json' is --baseline", watch=("baseline",)),
    Case("check-out-user-file", CHECK + " --max-drop 5 --out {tmp}/notes.txt --overwrite", 2,
         r"--out '.*notes.txt' exists and is not an earlier mbquant verdict", lambda c: _user_file(c, "notes.txt")),
    Case("check-out-exists", CHECK + " --max-drop 5 --out {tmp}/notes.txt", 2,
         r"--out '.*notes.txt' already exists; pass --overwrite", lambda c: _user_file(c, "notes.txt")),
    Case("baseline-out-onto-program", "baseline write {pte} --data {root}/val --tolerance 0.3 --out {bundle}/model.pte "
         "--overwrite", 2, r"--out '.*model.pte' exists and is not an earlier mbquant baseline", watch=("bundle",)),
    Case("baseline-out-exists", "baseline write {pte} --data {root}/val --tolerance 0.3 --out {baseline}", 2,
         r"--out '.*baseline.json' already exists; pass --overwrite", watch=("baseline",)),
    Case("baseline-out-is-artifact", "baseline write {pte} --data {root}/val --tolerance 0.3 --out {pte}", 2,
         r"--out '.*\.pte' is ARTIFACT", watch=("pte",)),
    Case("bundle-out-is-run", "bundle {run} --out {run} --overwrite", 2, r"--out '.*run' is RUN_DIR", watch=("run",)),
    Case("bundle-out-inside-run", "bundle {run} --out {run}/b", 2, r"--out '.*run/b' is inside RUN_DIR",
         watch=("run",)),
    Case("report-plots-over-user-pngs", "report {run} --plot --plot-dir {tmp}/pics", 2,
         r"--plot-dir '.*pics' holds files mbquant did not write", lambda c: _user_file(c, "pics/layer_sqnr.png")),
    Case("report-plot-dir-holds-run", "report {run} --plot --plot-dir {above}", 2, r"is or holds the run folder",
         lambda c: c.copy("run") and c.vars.update(above=str(c.w["run"].parent))),
    Case("train-out-in-data", "train mobilenet_v1 --data {root} --out {root}/train/bag/m.pth", 2,
         r"--out '.*m.pth' is inside --data train/"),
    # ---------------------------------------------------------------- publish after verify
    Case("bundle-from-truncated-program", "bundle {run} --out {bundle} --overwrite", 1,
         r"is not the file the run verified", _trunc, watch=("bundle",)),
    Case("bundle-fp32-as-int8", "bundle {run} --out {tmp}/b", 1, r"is not the file the run verified", _fp32_swapped,
         slow=True),
    # ---------------------------------------------------------------- only what can be judged
    Case("ptq-eval-limit-1", PTQ + " --eval-limit 1 --out {tmp}/o", 2,
         r"1 evaluation images cannot judge the quantization: gates need at least 100"),
    Case("check-strict-ci-10", CHECK + " --max-drop 1 --strict-ci --limit 10", 2,
         r"--limit 10 is too few images to judge an accuracy drop"),
    Case("report-sweep-too-many", "report {run} --calibration-sweep 100000", 2,
         r"--calibration-sweep 100000: the run's calibration folder '.*train' holds 400 images; pass counts up to 400"),
    Case("ptq-chance-level-model", PTQ.replace("{ck}", "{chance}") + " --out {tmp}/o", 1,
         r"the float model scores [\d.]+ % on 100 images of 10 classes, within noise of chance .* check its BatchNorm "
         r"statistics", _random_init, slow=True),
    Case("check-chance-level-model", "check {pte} --data {root}/val --float-weights {chance} --max-drop 5", 2,
         r"--float-weights '.*chance.pth' is not the checkpoint the artifact was quantized from", _random_init),
    # ---------------------------------------------------------------- numbers and names
    Case("tolerance-nan", "baseline write {pte} --data {root}/val --tolerance nan --out {tmp}/b.json", 2,
         r"--tolerance nan is not a finite number"),
    Case("tolerance-negative", "baseline write {pte} --data {root}/val --tolerance -5 --out {tmp}/b.json", 2,
         r"tolerance -5.0 pp is invalid; pass --tolerance with a number of percentage points in \[0, 100\]"),
    Case("check-tolerance-nan", "check {pte} --data {root}/val --baseline {baseline} --tolerance nan", 2,
         r"--tolerance nan is not a finite number"),
    Case("check-max-drop-nan", CHECK + " --max-drop nan", 2, r"--max-drop nan is not a finite number"),
    Case("check-decode-workers-negative", CHECK + " --max-drop 5 --decode-workers -2", 2,
         r"--decode-workers -2 is invalid; pass a value in \[0, 64\]"),
    Case("check-min-agreement-200", CHECK + " --min-agreement 200", 2,
         r"--min-agreement 200.0 is invalid; pass a number of percent in \[0, 100\]"),
    Case("seed-2-70", PTQ + " --seed 1180591620717411303424 --out {tmp}/o", 2,
         r"seed 1180591620717411303424 is out of range \[0, 4294967295\]"),
    Case("qat-lr-1e30", "qat mobilenet_v1 --weights {ck} --data {root} --lr 1e30 --out {tmp}/q", 2,
         r"learning rate 1e\+30 is out of range \(0.0, 10.0\]"),
    Case("empty-class-folder", PTQ + " --eval {tmp}/val --out {tmp}/o", 1, r"class folder '.*zzz' holds no images",
         lambda c: (shutil.copytree(c.w["root"] / "val", c.tmp / "val"), (c.tmp / "val" / "zzz").mkdir())),
    Case("pte-renamed-pt", "check {tmp}/m.pt --data {root}/val --float-weights {ck} --max-drop 5", 1,
         r"sidecar '.*m.pt.json' describes '.*_int8.pte', not 'm.pt'; keep each artifact with its own sidecar",
         lambda c: (shutil.copy(c.w["pte"], c.tmp / "m.pt"), shutil.copy(f"{c.w['pte']}.json", c.tmp / "m.pt.json"))),
    Case("bundle-9-labels", "check {bundle} --data {root}/val --float-weights {ck} --max-drop 5", 1,
         r"labels.txt is not the file the bundle was written with",
         lambda c: (lambda b: (b / "labels.txt").write_text("\n".join((b / "labels.txt").read_text().split()[:9])))(
             c.copy("bundle"))),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES])
def test_every_command_keeps_inputs_and_judges_only_what_it_can(case: Case, world, tmp_path, capsys):
    ctx = Ctx(tmp_path, dict(world))
    case.setup(ctx)
    before = {k: snapshot(ctx.w[k]) if ctx.w[k].is_dir() else ctx.w[k].read_bytes() for k in case.watch}
    argv = ctx.fmt(case.argv)
    argv = ["" if a == "''" else a for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:           # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == case.code, err
    assert re.search(case.message, err), err
    assert "Traceback" not in err
    for k, b in before.items():
        assert (snapshot(ctx.w[k]) if ctx.w[k].is_dir() else ctx.w[k].read_bytes()) == b, f"{k} changed"
    assert not list(tmp_path.glob("o")) and not list(tmp_path.glob(".o.*"))


def test_a_non_utf8_file_name_is_read_and_printed(world, tmp_path, capsys):
    root = world["root"]
    val = tmp_path / "val"
    shutil.copytree(root / "val", val)
    src = next((val / "bag").iterdir())
    os.rename(src, os.path.join(os.fsencode(val / "bag"), b"\xff\xfeodd.png"))
    assert main(["eval", "mobilenet_v1", "--weights", str(world["ck"]), "--data", str(val), "--quiet"]) == 0
    (val / "bag" / "broken.png").write_bytes(b"not a png")
    os.rename(val / "bag" / "broken.png", os.path.join(os.fsencode(val / "bag"), b"\xffbroken.png"))
    assert main(["eval", "mobilenet_v1", "--weights", str(world["ck"]), "--data", str(val)]) == 0
    out = capsys.readouterr().out
    assert "unreadable skipped" in out and "\\udcff" in out or "\\xff" in out


def test_a_full_disk_names_the_path_and_leaves_nothing(world, tmp_path, monkeypatch, capsys):
    import mbquant.atomic

    real = mbquant.atomic.write_bytes

    def full(path, data):
        if str(path).endswith(".pte"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(mbquant.atomic, "write_bytes", full)
    import importlib

    monkeypatch.setattr(importlib.import_module("mbquant.mobile.xnnpack.lower"), "write_bytes", full)
    stub_lowering(monkeypatch)                  # what the program holds does not matter to a full disk
    root = world["root"]
    rc = main(["ptq", "mobilenet_v1", "--weights", str(world["ck"]), "--calib", str(root / "train"), "--eval",
               str(root / "val"), "--num-calib", "16", "--no-float-program", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and re.search(r"cannot use '.*_int8.pte': No space left on device; free disk space", err), err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_reference_client_explains_a_mismatched_bundle(world, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(world["bundle"], bundle)
    (bundle / "labels.txt").write_text("a\nb\n")
    proc = subprocess.run([sys.executable, "-m", "mbquant.mobile.xnnpack.client", str(bundle),
                           str(world["root"] / "val")], capture_output=True, text=True)
    assert proc.returncode == 1 and "labels.txt is not the file the bundle was written with" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_training_recalibrates_batchnorm_and_refuses_an_eval_mode_that_does_not_work(world, tmp_path, capsys):
    """torchvision's MobileNetV3 has BatchNorm momentum 0.01: a few dozen steps leave its running statistics near
    their initial values and eval mode at chance. `train` re-estimates them (cumulative average) before it writes;
    without that (--bn-recalibration 0) the model is refused, not saved."""
    from tests.conftest import stub_lowering, UNIT, needs

    needs("real Fashion-MNIST images (eval-mode accuracy after three epochs)", not UNIT, "run `make test`")
    root = world["root"]
    argv = ["train", "mobilenet_v3_small", "--data", str(root), "--width-mult", "0.5", "--resolution", "32",
            "--epochs", "3", "--batch-size", "32", "--quiet"]
    assert main([*argv, "--bn-recalibration", "0", "--out", str(tmp_path / "raw.pth")]) == 1
    err = capsys.readouterr().err
    assert re.search(r"in eval mode the model scores [\d.]+ % on \d+ of its own training images, [\d.]+ pp below the "
                     r"[\d.]+ % training measured .*BN recalibration was off", err), err
    assert not (tmp_path / "raw.pth").exists()
    assert main([*argv, "--out", str(tmp_path / "ok.pth")]) == 0
    metrics = torch.load(tmp_path / "ok.pth", weights_only=True)["metrics"]
    assert metrics["bn_recalibration_images"] == 400
    assert metrics["eval_train_top1"] >= metrics["history"][-1]["train_top1"] - 20


# --------------------------------------------------------------------------------------------- kill tests

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mbquant", *args]


def _kill_when(cmd: list[str], ready: Callable[[], bool], timeout: float = 300) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < timeout:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    return proc.wait(timeout=timeout)


def test_bundle_killed_while_staging_leaves_the_earlier_bundle(world, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(world["bundle"], out)
    before = snapshot(out)
    rc = _kill_when(_cli("bundle", str(world["run"]), "--out", str(out), "--overwrite"),
                    lambda: bool(list(tmp_path.glob(".bundle.staging-*/*.json"))))
    assert rc == -signal.SIGKILL and snapshot(out) == before
    assert main(["bundle", str(world["run"]), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]       # what the kill left is cleaned up


@pytest.mark.parametrize("command", ["check", "baseline"])
def test_check_and_baseline_killed_mid_measurement_write_nothing(world, tmp_path, command):
    out = tmp_path / "out.json"
    args = (["check", str(world["pte"]), "--data", str(world["root"] / "val"), "--float-weights", str(world["ck"]),
             "--max-drop", "5", "--out", str(out)] if command == "check" else
            ["baseline", "write", str(world["pte"]), "--data", str(world["root"] / "val"), "--float-weights",
             str(world["ck"]), "--tolerance", "0.3", "--out", str(out)])
    t0 = time.monotonic()
    rc = _kill_when(_cli(*args), lambda: time.monotonic() - t0 > 4)
    assert rc in (0, -signal.SIGKILL)
    if rc == 0 or out.exists():
        # it finished, or the kill landed after the atomic rename (the file is written last, so a kill during the
        # measurement cannot leave it): then the file is complete and nothing else is there
        assert json.loads(out.read_text())["format"].startswith("mbquant-")
        assert list(tmp_path.iterdir()) == [out]
    else:
        assert list(tmp_path.iterdir()) == []                          # no partial file, no temporary one
