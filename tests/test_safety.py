"""Hostile and careless input, table-driven: every case gets a clear message (the problem, the value, the fix),
a non-zero exit and no traceback; nothing the user owns is deleted or changed; no artifact that looks finished
is left after a failure. Then the run-folder protocol: lock, staging, --overwrite, stale leftovers, interrupts."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from mbquant.cli import main
from mbquant.data.dataset import Skipped
from tests.conftest import stub_lowering

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash (to prove nothing was deleted or changed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb, without the bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@dataclass
class Ctx:
    tmp: Path
    root: Path          # tiny data: train/ (120 real images), val/ (100)
    ck: Path            # a tiny mbquant checkpoint (MobileNetV1 0.25 at 32x32)
    vars: dict = field(default_factory=dict)

    def fmt(self, s: str) -> str:
        return s.format(tmp=self.tmp, root=self.root, ck=self.ck, **self.vars)


@dataclass
class Case:
    id: str
    argv: str
    code: int
    message: str                                       # regex on stderr: the problem and the fix
    setup: Callable[[Ctx], None] = lambda ctx: None
    check: Callable[[Ctx], None] = lambda ctx: None


def _ck_with(ctx: Ctx, name: str, change: Callable[[dict], None]) -> None:
    ck = torch.load(ctx.ck, weights_only=True)
    change(ck)
    torch.save(ck, ctx.tmp / name)


def _nan_weights(ck: dict) -> None:
    ck["state_dict"]["features.0.0.weight"][0, 0, 0, 0] = math.nan


def _user_folder(ctx: Ctx, split: str) -> None:
    (ctx.tmp / "dest" / split / "cats").mkdir(parents=True)
    (ctx.tmp / "dest" / split / "cats" / "mine.png").write_bytes(b"my own picture")
    ctx.vars["before"] = snapshot(ctx.tmp / "dest")


def _unchanged(ctx: Ctx) -> None:
    assert snapshot(ctx.tmp / "dest") == ctx.vars["before"]


def _no_out(ctx: Ctx) -> None:
    assert not (ctx.tmp / "out").exists() and not list(ctx.tmp.glob(".out.*"))


def _fifo(ctx: Ctx) -> None:
    os.mkfifo(ctx.tmp / "pipe.pth")


def _flat(ctx: Ctx) -> None:
    (ctx.tmp / "flat").mkdir()
    for p in sorted((ctx.root / "val").rglob("*.png"))[:5]:
        shutil.copy(p, ctx.tmp / "flat" / p.name)


PTQ = "ptq mobilenet_v1 --weights {ck} --calib {root}/train --eval {root}/val --out {tmp}/out --quiet"
CASES = [
    # data: never delete what mbquant did not create
    Case("data-user-train", "data fashion-mnist {tmp}/dest --quiet", 1,
         r"'.*dest/train' exists and it holds files mbquant did not write; mbquant never deletes",
         lambda c: _user_folder(c, "train"), _unchanged),
    Case("data-user-val", "data fashion-mnist {tmp}/dest --quiet", 1, r"'.*dest/val' exists and it holds files",
         lambda c: _user_folder(c, "val"), _unchanged),
    Case("data-damaged-marker", "data fashion-mnist {tmp}/dest --quiet", 1, r"its \.complete marker is damaged",
         lambda c: (_user_folder(c, "train"), (c.tmp / "dest/train/.complete").write_text(""),
                    c.vars.update(before=snapshot(c.tmp / "dest"))), _unchanged),
    Case("data-dest-file", "data fashion-mnist {tmp}/file --quiet", 1, r"DEST '.*file' is a file; pass a folder",
         lambda c: (c.tmp / "file").write_text("x")),
    Case("data-dest-sys", "data fashion-mnist /sys/mbquant-data --quiet", 1, r"cannot create data folder DEST"),
    # numbers: finite, in range, before any work
    Case("max-drop-nan", PTQ + " --max-drop nan", 2, r"--max-drop nan is not a finite number; pass a number",
         check=_no_out),
    Case("max-drop-negative", PTQ + " --max-drop -1", 2, r"max_drop .* -1.0 is out of range \[0.0, 100.0\]"),
    Case("min-parity-200", PTQ + " --min-parity 200", 2, r"min_parity \(%\) 200.0 is out of range"),
    Case("parity-z-0", PTQ + " --parity-z 0", 2, r"parity_z 0.0 is out of range"),
    Case("num-calib-negative", PTQ + " --num-calib -5", 2, r"num_calib \(calibration samples\) -5 is out of range"),
    Case("eval-limit-0", PTQ + " --eval-limit 0", 2, r"eval_limit 0 is out of range"),
    Case("batch-size-0", PTQ + " --batch-size 0", 2, r"--batch-size 0 is invalid; pass a value in \[1, 65536\]"),
    Case("percentile-101", PTQ + " --percentile 101", 2, r"percentile 101.0 is out of range \(50.0, 100.0\]"),
    Case("latency-runs-0", PTQ + " --latency-runs 0", 2, r"--latency-runs 0 is invalid"),
    Case("decode-workers-negative", PTQ + " --decode-workers -1", 2,
         r"--decode-workers -1 is invalid; pass a value in \[0, 64\]", check=_no_out),
    Case("eval-decode-workers-65", "eval mobilenet_v1 --weights {ck} --data {root}/val --decode-workers 65", 2,
         r"--decode-workers 65 is invalid; pass a value in \[0, 64\]"),
    Case("threads-negative", PTQ + " --threads -1", 2, r"--threads -1 is invalid; pass a value in \[1, 1024\]"),
    Case("threads-zero", PTQ + " --threads 0", 2, r"--threads 0 is invalid"),
    Case("max-pixels-0", PTQ + " --max-image-pixels 0", 2, r"--max-image-pixels 0 is invalid"),
    Case("eval-batch-0", "eval mobilenet_v1 --weights {ck} --data {root}/val --batch-size 0", 2,
         r"--batch-size 0 is invalid"),
    Case("eval-batch-negative", "eval mobilenet_v1 --weights {ck} --data {root}/val --batch-size -1", 2,
         r"--batch-size -1 is invalid"),
    Case("train-weight-decay-nan", "train mobilenet_v1 --data {root} --weight-decay nan --out {tmp}/m.pth", 2,
         r"weight_decay must be a number, got nan"),
    Case("train-width-inf", "train mobilenet_v1 --data {root} --width-mult inf --out {tmp}/m.pth", 2,
         r"--width-mult inf is invalid"),
    Case("train-out-folder", "train mobilenet_v1 --data {root} --out {tmp}", 2,
         r"--out '.*' is a folder; pass a file path for the checkpoint"),
    Case("train-out-exists", "train mobilenet_v1 --data {root} --out {tmp}/m.pth", 2,
         r"--out '.*m.pth' already exists; pass --overwrite", lambda c: (c.tmp / "m.pth").write_text("keep me"),
         lambda c: (c.tmp / "m.pth").read_text() == "keep me" or pytest.fail("changed")),
    # checkpoints: validated by schema, never executed, never trusted blindly
    Case("ckpt-nan", PTQ.replace("{ck}", "{tmp}/nan.pth"), 2,
         r"hold non-finite values in 'features.0.0.weight' \(1 of 216\).*retrain",
         lambda c: _ck_with(c, "nan.pth", _nan_weights), _no_out),
    Case("ckpt-missing-key", PTQ.replace("{ck}", "{tmp}/k.pth"), 2, r"lacks 'num_classes'",
         lambda c: _ck_with(c, "k.pth", lambda ck: ck.pop("num_classes"))),
    Case("ckpt-extra-preset-key", PTQ.replace("{ck}", "{tmp}/k.pth"), 2, r"preset has unknown keys \['gamma'\]",
         lambda c: _ck_with(c, "k.pth", lambda ck: ck["preset"].update(gamma=2.2))),
    Case("ckpt-string-classes", PTQ.replace("{ck}", "{tmp}/k.pth"), 2, r"'num_classes' is 'ten' \(str\)",
         lambda c: _ck_with(c, "k.pth", lambda ck: ck.update(num_classes="ten"))),
    Case("ckpt-width-200", PTQ.replace("{ck}", "{tmp}/k.pth"), 2, r"width_mult 200 is out of range \(0, 4.0\]",
         lambda c: _ck_with(c, "k.pth", lambda ck: ck.update(width_mult=200))),
    Case("ckpt-pickled-model", PTQ.replace("{ck}", "{tmp}/m.pth"), 2,
         r"holds pickled Python objects \(a whole model\?\).*save `model.state_dict\(\)`",
         lambda c: torch.save(torch.nn.Linear(2, 2), c.tmp / "m.pth")),
    Case("ckpt-fifo", PTQ.replace("{ck}", "{tmp}/pipe.pth"), 2, r"is not a regular file \(a pipe or device\?\)",
         _fifo),
    Case("ckpt-typo", PTQ.replace("{ck}", "mobilenet_v1_w0.25_r96_fmist"), 2,
         r"did you mean mobilenet_v1_w0.25_r96_fmnist"),
    Case("ckpt-missing", PTQ.replace("{ck}", "{tmp}/nope.pth"), 2, r"'.*nope.pth' does not exist"),
    Case("qat-resume-handmade", "qat mobilenet_v1 --weights {ck} --data {root} --resume {tmp}/r.pt --out {tmp}/q", 2,
         r"lacks 'float_digest'",
         lambda c: torch.save({"format": "mbquant-qat-checkpoint/1", "model": {}}, c.tmp / "r.pt")),
    # folders and images
    Case("eval-flat-folder", "eval mobilenet_v1 --weights {ck} --data {tmp}/flat", 1,
         r"has 5 images but no class subfolders; this needs labelled images", _flat),
    Case("calib-missing", PTQ.replace("{root}/train", "{tmp}/nothing"), 1, r"'.*nothing' does not exist", check=_no_out),
    Case("calib-empty", PTQ.replace("{root}/train", "{tmp}/empty"), 1, r"has no images",
         lambda c: (c.tmp / "empty").mkdir(), _no_out),
    Case("out-is-file", PTQ.replace("{tmp}/out", "{tmp}/f"), 2, r"--out '.*f' is a file",
         lambda c: (c.tmp / "f").write_text("x")),
    Case("out-exists", PTQ, 2, r"--out '.*out' already exists \(an earlier run\?\); pass --overwrite",
         lambda c: ((c.tmp / "out").mkdir(), (c.tmp / "out" / "keep.txt").write_text("mine")),
         lambda c: (c.tmp / "out" / "keep.txt").read_text() == "mine" or pytest.fail("changed")),
    Case("out-locked", PTQ, 2, r"another mbquant run \(pid \d+ on .*\) is writing '.*out'; wait for it",
         lambda c: (c.tmp / ".out.lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename,
                                                                 "started": "now"}))),
    Case("unknown-model", "eval mobilenet_v9 --data {root}/val", 2, r"unknown model 'mobilenet_v9'; available"),
    Case("bias-correction-torchscript", PTQ + " --format torchscript --bias-correction", 2,
         r"--bias-correction is not supported by backend 'ts-qnnpack'; supported by: pte-xnnpack"),
    Case("keep-float-unknown", PTQ + " --keep-float classifer.1", 2,
         r"'classifer.1' is not a layer of MobileNetV1; did you mean classifier.1"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_message_with_a_fix(case: Case, tiny_ckpt, tmp_path, capsys):
    root, ck = tiny_ckpt
    ctx = Ctx(tmp_path, root, ck)
    case.setup(ctx)
    rc = main(ctx.fmt(case.argv).split())
    err = capsys.readouterr().err
    assert rc == case.code, err
    assert re.search(case.message, err), err
    assert "Traceback" not in err
    case.check(ctx)


def test_an_unforeseen_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, tiny_ckpt, capsys):
    import mbquant.cli as cli

    def boom(args):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "eval", boom)
    assert main(["eval", "mobilenet_v1", "--data", "x"]) == 3
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: something nobody foresaw; rerun with --debug" in err and "second" not in err
    with pytest.raises(RuntimeError):
        main(["eval", "mobilenet_v1", "--data", "x", "--debug"])


# --------------------------------------------------------------------------- images

def _dataset(root: Path):
    from mbquant.data import load_folder, small_preset

    return load_folder(root, small_preset(32))


def test_16bit_and_float_images_decode_like_their_8bit_versions(tmp_path):
    grad = np.tile(np.linspace(0, 255, 28).round().astype(np.uint8), (28, 1))
    (tmp_path / "a").mkdir()
    Image.fromarray(grad, "L").save(tmp_path / "a" / "8bit.png")
    Image.fromarray(grad.astype(np.uint16) * 257).save(tmp_path / "a" / "16bit.png")
    Image.fromarray(grad.astype(np.float32) / 255).save(tmp_path / "a" / "float01.tif")
    Image.fromarray(grad.astype(np.float32)).save(tmp_path / "a" / "float255.tif")
    Image.fromarray(grad.astype(np.float32) * 1000).save(tmp_path / "a" / "float_huge.tif")
    ds = _dataset(tmp_path)
    images = {s.path.name: ds[i] for i, s in enumerate(ds.samples)}
    ref = images["8bit.png"][0]
    for name in ("16bit.png", "float01.tif", "float255.tif"):
        assert torch.allclose(images[name][0], ref, atol=1e-6), name
    assert isinstance(images["float_huge.tif"], Skipped)
    assert "float pixels in [0, 255000] (expected [0, 1] or [0, 255])" in ds.skipped[tmp_path / "a" / "float_huge.tif"]


def test_decompression_bombs_are_skipped_and_counted_with_a_bound_to_raise(tmp_path):
    from mbquant.data import load_folder, small_preset

    (tmp_path / "a").mkdir()
    bomb = png_header_only(tmp_path / "a" / "bomb.png", 20000, 20000)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a" / "ok.png")
    ds = _dataset(tmp_path)
    assert isinstance(ds[0], Skipped) and not isinstance(ds[1], Skipped)
    assert "20000x20000 pixels, more than the bound of 89478485" in ds.skipped[bomb]
    assert "--max-image-pixels" in ds.skipped[bomb]
    raised = load_folder(tmp_path, small_preset(32), max_pixels=400_000_000)
    assert isinstance(raised[0], Skipped) and "bound" not in raised.skipped[bomb]  # past the bound, the broken data fails


def test_training_on_other_image_sizes_derives_the_preset_from_the_data(tiny_ckpt, tmp_path, capsys):
    """20x20 images with the default (small) preset: trained, with the data's own mean/std in the checkpoint."""
    root, _ = tiny_ckpt
    for split in ("train", "val"):
        for p in sorted((root / split).rglob("*.png")):
            dst = tmp_path / "d" / split / p.parent.name / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.open(p).resize((20, 20)).save(dst)
    out = tmp_path / "m.pth"
    assert main(["train", "mobilenet_v1", "--data", str(tmp_path / "d"), "--width-mult", "0.25", "--resolution", "32",
                 "--epochs", "1", "--batch-size", "16", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    preset = torch.load(out, weights_only=True)["preset"]
    # the data's own mean (Fashion-MNIST at 20x20: about 0.29; the unit tier's synthetic bars: about 0.19), not 0.286
    assert preset["kind"] == "small" and 0.1 < preset["mean"][0] < 0.4 and preset["mean"][0] != 0.286


def test_fashion_mnist_mean_std_are_what_the_preset_derives(fmnist):
    from mbquant.data import channel_stats, load_folder, small_preset

    ds = load_folder(fmnist / "val", small_preset(28))
    mean, std = channel_stats(ds, grayscale=True)
    assert abs(mean[0] - 0.2860) < 0.002 and abs(std[0] - 0.3530) < 0.002  # the shipped checkpoints' constants


def test_strict_json_never_writes_nan(tmp_path):
    from mbquant._io import write_json

    write_json(tmp_path / "r.json", {"a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": "nan", "b": ["inf", 1.0], "c": {"d": "-inf"}}


# --------------------------------------------------------------------------- data and run folders

def _tiny_source(tmp_path: Path) -> Path:
    from mbquant.data.fashion_mnist import FASHION_MNIST_DIR, _read_idx
    from tests.data.test_data import _write_idx

    src = tmp_path / "src"
    src.mkdir()
    for prefix, n in (("train", 30), ("t10k", 20)):
        _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")[:n])
        _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")[:n])
    return src


def test_data_removes_only_its_own_leftovers(tmp_path, fmnist):
    from mbquant.data.fashion_mnist import prepare_fashion_mnist

    src, dest = _tiny_source(tmp_path), tmp_path / "dest"
    stale = dest / f".mbquant-staging-train-{dead_pid()}"
    (stale / "bag").mkdir(parents=True)
    (dest / "train").mkdir()                               # an empty folder is fine to fill
    (dest / "notes.txt").write_text("mine")
    res = prepare_fashion_mnist(dest, source=src, progress=False)
    assert (res["train"], res["val"]) == (30, 20) and not stale.exists()
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt", "train", "val"]
    assert (dest / "notes.txt").read_text() == "mine"


def test_run_folder_recovers_what_killed_runs_left(tmp_path):
    from mbquant._io import RunFolder

    out = tmp_path / "out"
    old = tmp_path / f".out.old-{dead_pid()}"            # killed between moving the old run away and publishing
    old.mkdir()
    (old / "report.json").write_text("previous run")
    staging = tmp_path / f".out.staging-{dead_pid()}"
    staging.mkdir()
    (tmp_path / ".out.lock").write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename}))
    with RunFolder(out, overwrite=True) as folder:
        assert (out / "report.json").read_text() == "previous run" and not staging.exists() and not old.exists()
        assert len(folder.notes) == 3
        (folder.staging / "report.json").write_text("new run")
        folder.publish()
    assert (out / "report.json").read_text() == "new run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _ptq(root, ck, out, *extra, eval_dir=None):
    return ["ptq", "mobilenet_v1", "--weights", str(ck), "--calib", str(root / "train"),
            "--eval", str(eval_dir or root / "val"), "--num-calib", "16", "--eval-limit", "100", "--no-float-program",
            "--latency-runs", "1", "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def good_run(tiny_ckpt, tmp_path_factory):
    root, ck = tiny_ckpt
    out = tmp_path_factory.mktemp("runs") / "good"
    assert main(_ptq(root, ck, out)) == 0
    return out


@pytest.mark.slow   # the kill tests (make test-slow) also check the earlier run stays untouched
def test_a_failing_run_never_replaces_a_verified_one(good_run, tiny_ckpt, tmp_path, capsys):
    """An earlier verified run as --out with --overwrite, and a new run whose every eval image is unreadable."""
    root, ck = tiny_ckpt
    out = tmp_path / "good"
    shutil.copytree(good_run, out)
    before = snapshot(out)
    bad = tmp_path / "bad_val"
    for cls in sorted(p.name for p in (root / "val").iterdir()):
        (bad / cls).mkdir(parents=True)
        for i in range(10):
            (bad / cls / f"{i}.png").write_bytes(b"not an image")
    rc = main(_ptq(root, ck, out, "--overwrite", eval_dir=bad))
    err = capsys.readouterr().err
    assert rc == 1 and "no readable labelled evaluation images among 100 (100 unreadable)" in err, err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad_val", "good"]


def test_a_failed_gate_keeps_only_the_report(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import mbquant.pipeline

    root, ck = tiny_ckpt
    monkeypatch.setattr(mbquant.pipeline, "gate_failures", lambda *args: ["a gate that failed"])
    assert main(_ptq(root, ck, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert "a gate that failed" in err and "no artifact was kept; the report is in" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.failed"]
    assert sorted(p.name for p in (tmp_path / "run.failed").iterdir()) == ["report.json"]
    assert json.loads((tmp_path / "run.failed" / "report.json").read_text())["status"] == "failed"


def test_an_interrupted_run_leaves_nothing_and_releases_the_lock(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the .pte is written: exit 130, no --out, no staging, no lock; the next run is not blocked."""
    from mbquant.mobile.xnnpack import XnnpackBackend

    root, ck = tiny_ckpt
    real = XnnpackBackend.write

    def write_then_interrupt(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(XnnpackBackend, "write", write_then_interrupt)
    stub_lowering(monkeypatch)                  # interrupted after the write: what the program holds does not matter
    assert main(_ptq(root, ck, tmp_path / "out")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _watch_and_kill(cmd: list[str], parent: Path, trigger: str, sig: int, timeout: float = 300):
    """Start ``cmd``, send ``sig`` once a file matching ``trigger`` appears in a staging folder under ``parent``."""
    import signal  # noqa: F401 - the caller passes signal.SIG*
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < timeout:
        if list(parent.glob(f".*.staging-*/{trigger}")):
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "mbquant", *args]


@pytest.mark.slow
def test_sigkill_after_the_pte_is_written_leaves_no_run_and_the_next_run_cleans_up(good_run, tiny_ckpt, tmp_path):
    import signal

    root, ck = tiny_ckpt
    out = tmp_path / "good"
    shutil.copytree(good_run, out)
    before = snapshot(out)
    rc, _ = _watch_and_kill(_cli(*_ptq(root, ck, out, "--overwrite", "--threads", "1")), tmp_path, "*.pte",
                            signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert snapshot(out) == before                        # the previous run is untouched
    assert list(tmp_path.glob(".good.staging-*")) and (tmp_path / ".good.lock").exists()   # what a kill leaves
    proc = subprocess.run(_cli(*_ptq(root, ck, out, "--overwrite", "--threads", "1")), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]   # stale staging and lock removed
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and any("left by a killed run" in n for n in rep["notes"])
    assert "cpuinfo" not in proc.stderr and "threadpool" not in proc.stderr and "KernelPreference" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("trigger", ["*.pte", "*.pte.json", "report.json"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGKILL", "SIGTERM"])
def test_killed_at_any_point_the_out_folder_is_absent_or_complete(good_run, tiny_ckpt, tmp_path, trigger, signame):
    import signal

    root, ck = tiny_ckpt
    out = tmp_path / "good"
    shutil.copytree(good_run, out)
    before = snapshot(out)
    rc, err = _watch_and_kill(_cli(*_ptq(root, ck, out, "--overwrite", "--threads", "1")), tmp_path, trigger,
                              getattr(signal, signame))
    now = snapshot(out)
    if now != before:   # the run published before the signal landed: then it is complete and verified
        assert rc in (0, 130) and json.loads((out / "report.json").read_text())["status"] == "ok"
        assert {"report.json", "mobilenet_v1_w0.25_r32_int8.pte", "mobilenet_v1_w0.25_r32_int8.pte.json"} <= set(now)
    elif signame != "SIGKILL":
        assert rc == 130 and "interrupted" in err and sorted(p.name for p in tmp_path.iterdir()) == ["good"]


def test_help_and_quiet_print_no_third_party_lines():
    proc = subprocess.run([str(Path(sys.executable).with_name("mbquant")), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""


def test_a_plain_state_dict_of_a_shipped_width_loads_from_the_cli(tiny_ckpt, tmp_path, capsys):
    from mbquant.models import resolve_model

    from tests.conftest import UNIT, needs

    needs("real Fashion-MNIST images (the shipped checkpoint's accuracy)", not UNIT, "run `make test`")
    root, _ = tiny_ckpt
    model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    args = ["eval", "mobilenet_v2", "--weights", str(tmp_path / "sd.pth"), "--data", str(root / "val"), "--json"]
    assert main(args) == 2
    assert "pass --width-mult and --num-classes as the weights were trained" in capsys.readouterr().err
    assert main([*args, "--width-mult", "0.35", "--preset", "small", "--resolution", "64"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 100 and res["top1"] >= 80 and res["model"]["num_classes"] == 10
    assert main(["eval", "mobilenet_v2", "--weights", "mobilenet_v2_w0.35_r64_fmnist", "--data", str(root / "val"),
                 "--width-mult", "0.35"]) == 2
    assert "describe a plain state dict" in capsys.readouterr().err
