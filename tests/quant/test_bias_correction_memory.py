"""Bias correction's memory does not grow with the number of calibration images: the streaming implementation's
peak resident memory during the correction, measured in a fresh process, is the same for 64 and 512 images,
while the in-memory algorithm it replaced (tests/quant/reference_bias_correction.py) grows with them, which shows
the measurement can see growth. (make test-slow: four fresh processes, about two minutes.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, os, sys, threading, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from mbquant import calibrate
from mbquant.data.contract import spec_of
from mbquant.models import resolve_model
from mbquant.quant.bias_correction import correct_biases
from mbquant.quant.export import FloatModel
from tests.conftest import quantize_pt2e
from tests.quant.reference_bias_correction import correct_biases_in_memory

PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

data, n, algo = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
calib = calibrate.from_folder(data / "train", spec_of(info.preset), n, seed=0, expected_classes=info.classes)
int8 = quantize_pt2e(model, info.resolution, calib, bias_correction=False).int8
fm = FloatModel(model, info.resolution)
if algo == "streaming":          # as the pipeline calls it: batches decoded again on each read
    run = lambda: correct_biases(int8, fm.graph, lambda: calib.batches(32))
else:
    batches = list(calib.batches(32))
    run = lambda: correct_biases_in_memory(int8, fm.graph, batches)
peak, stop = [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
base = rss()
t = threading.Thread(target=sample)
t.start()
res = run()
stop.set()
t.join()
print(json.dumps({"growth_mb": (max(peak[0], rss()) - base) / 2 ** 20, "samples": res.samples}))
'''


def _growth(data: Path, images: int, algo: str) -> float:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(images), algo], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["samples"] == images
    return out["growth_mb"]


@pytest.mark.slow
def test_bias_correction_memory_does_not_grow_with_the_calibration_set(fmnist):
    streaming = {n: _growth(fmnist, n, "streaming") for n in (64, 512)}
    in_memory = {n: _growth(fmnist, n, "in-memory") for n in (64, 512)}
    seen = in_memory[512] - in_memory[64]
    assert seen > 64, f"the in-memory algorithm grew by only {seen:.0f} MB; the measurement cannot judge"
    grew = streaming[512] - streaming[64]
    assert grew < max(16.0, 0.1 * seen), (f"streaming bias correction grew by {grew:.0f} MB from 64 to 512 images "
                                          f"({streaming}); the in-memory algorithm by {seen:.0f} MB ({in_memory})")
