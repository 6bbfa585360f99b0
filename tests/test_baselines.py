"""Every flow of tests/baselines (a shipped checkpoint, a target, its CLI command on real data) against its
recorded baseline: the 2,000-image slice here, all 10,000 val images with `make test-slow`."""
from __future__ import annotations

import pytest

from mbquant.check import judge, report_verdict
from mbquant.records import Baseline
from tests.baselines.flows import FLOWS, SIZES, tolerance

# make test checks one flow per command and target on 2,000 images (the phone checkpoint's PTQ, the MCU checkpoint's
# PTQ, QAT); make test-slow checks every flow on 2,000 and on all 10,000
FAST = {"mobilenet_v2_w0.5_r64_fmnist.ptq-phone", "mobilenet_v1_w0.25_r96_fmnist.ptq-mcu",
        "mobilenet_v2_w0.35_r64_fmnist.qat"}
SIZED = [pytest.param(key, n, id=f"{key}.{n}", marks=[] if n == SIZES[0] and key in FAST else [pytest.mark.slow])
         for n in SIZES for key in FLOWS]


@pytest.mark.parametrize("key,images", SIZED)
def test_flow_keeps_its_baseline(flow_runs, fmnist, key, images):
    flow = FLOWS[key]
    out, rep = flow_runs.get(key, images)
    base = Baseline.read(flow.baseline_path(images))
    # the run measured its artifact from the file; judge checks it evaluated the images the baseline was recorded on
    v = judge(report_verdict(out, flow.artifact), baseline=base)
    assert v.ok, v.text()
    assert v.images == images and base.extra["command"].startswith(f"mbquant {flow.command} {flow.model} --weights "
                                                                   f"{flow.checkpoint}")


@pytest.mark.parametrize("key", FLOWS)
def test_every_baseline_states_its_measured_tolerance(key):
    """The tolerance next to each baseline is the one its recorded spreads give, and says why."""
    for images in SIZES:
        base = FLOWS[key].baseline(images)
        assert base["format"] in ("mbquant-baseline/1", "mbquant-baseline/2") and base["images"] == images
        Baseline.read(FLOWS[key].baseline_path(images))                        # each file reads as a record
        assert (base["tolerance_pp"], base["tolerance_why"]) == tolerance(base["spreads_pp"], images)
        on = "" if images == SIZES[0] else f" (on {SIZES[0]:,})"      # spreads the slice measured for all 10,000
        assert set(base["spreads_pp"]) == {"run to run" + on, "native vs oneDNN float convolutions" + on,
                                           "artifact vs its INT8 model"}
        assert 0 < base["tolerance_pp"] <= 1.0      # a tolerance that hides a regression of a point is no check


def test_tolerance_rule():
    assert tolerance({"a": 0.0, "b": 0.0}, 2000)[0] == 0.1            # the floor: 0.1 pp and two images
    assert tolerance({"a": 0.0}, 1000)[0] == 0.2
    assert tolerance({"a": 0.1, "b": 0.02}, 10000)[0] == 0.2
    assert tolerance({"a": 0.11}, 10000)[0] == 0.25                   # rounded up, never down
