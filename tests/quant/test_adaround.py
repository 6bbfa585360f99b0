"""AdaRound on converted PT2E graphs: the weights stay on the backend's grid, and each layer's output error drops."""
import copy

import pytest
import torch

from mbquant import calibrate
from mbquant.config import QuantConfig
from mbquant.data.contract import spec_of
from mbquant.errors import ConfigError
from mbquant.mobile import table
from mbquant.models import resolve_model
from mbquant.quant.adaround import _grid, adaround
from mbquant.quant.ops import CONV_OPS, LINEAR_OPS
from tests.conftest import quantize_pt2e

_CACHE: dict = {}


def _setup(fmnist, granularity):
    """(the float graph quantized, a fresh copy of the INT8 graph before AdaRound, calibration batches), quantized
    once."""
    if granularity not in _CACHE:
        model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
        calib = calibrate.from_folder(fmnist / "train", spec_of(info.preset), 32, seed=0, expected_classes=info.classes)
        q = quantize_pt2e(model, info.resolution, calib, bias_correction=False, granularity=granularity,
                          equalize=granularity == "per-tensor")
        _CACHE[granularity] = q.source.graph, q.int8, list(calib.batches(32))    # equalized for per-tensor
    graph, int8, batches = _CACHE[granularity]
    return graph, copy.deepcopy(int8), batches


def _grids(gm):
    layers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_OPS | LINEAR_OPS]
    return {n.name: g for n in layers if (g := _grid(gm, n)) is not None}


def test_weights_stay_on_their_grid_and_layer_errors_drop(fmnist):
    graph, int8, batches = _setup(fmnist, "per-tensor")
    before = {k: (g.q.clone(), g.scale.clone(), g.zero_point.clone(), g.qmin, g.qmax) for k, g in _grids(int8).items()}
    res = adaround(int8, graph, batches, iterations=25, seed=0)
    after = _grids(int8)
    assert set(after) == set(before) and len(res.layers) == len(before) == 52      # every INT8 conv; fp32 logits skipped
    assert res.skipped_float == ["linear"] and res.samples == 32
    changed = 0
    for name, (q, scale, zp, qmin, qmax) in before.items():
        g = after[name]
        assert g.q.dtype == q.dtype and torch.equal(g.scale, scale) and torch.equal(g.zero_point, zp)
        assert (g.qmin, g.qmax) == (qmin, qmax) and int(g.q.min()) >= qmin and int(g.q.max()) <= qmax
        step = (g.q.to(torch.int32) - q.to(torch.int32)).abs()
        assert int(step.max()) <= 1                        # up or down from the nearest rounding, never further
        changed += int((step > 0).sum())
    assert changed > 0
    for r in res.layers:                                    # each layer keeps the rounding with the lower error
        assert min(r.error_adaround, r.error_nearest) <= r.error_nearest
        assert (r.kept == "adaround") == (r.error_adaround < r.error_nearest)
    d = res.to_dict()
    assert d["layers_rounded"] > 40 and d["mean_error_adaround"] < d["mean_error_nearest"]
    first = res.layers[0]                                   # its input is the image: its error is the weights' alone
    assert first.kept == "adaround" and first.error_adaround < 0.7 * first.error_nearest


def test_the_table_offers_adaround_where_the_weights_are_a_pt2e_graphs():
    pte, ts = table.get_spec("pte-xnnpack"), table.get_spec("ts-qnnpack")
    assert table.resolve(QuantConfig(), pte).adaround is False                      # off unless asked
    on = table.resolve(QuantConfig(adaround=True), pte)
    assert on.adaround and on.adaround_images == 256 and on.adaround_iterations == 500
    assert table.resolve(QuantConfig(adaround=True), table.get_spec("pte-cortex-m")).adaround
    with pytest.raises(ConfigError, match="--adaround is not supported by backend 'ts-qnnpack'"):
        table.resolve(QuantConfig(adaround=True), ts)
    with pytest.raises(ConfigError, match="--adaround: AdaRound is a post-training fix"):
        table.resolve(QuantConfig(adaround=True), pte, qat=True)
    with pytest.raises(ConfigError, match="--adaround-images 64 with --no-adaround"):
        table.resolve(QuantConfig(adaround=False, adaround_images=64), pte)
    with pytest.raises(ConfigError, match="--adaround-images 64 without AdaRound"):
        table.resolve(QuantConfig(adaround_images=64), pte)
    with pytest.raises(ConfigError, match="--adaround-iterations 50 without AdaRound.*drop --adaround-iterations"):
        table.resolve(QuantConfig(adaround_iterations=50), pte)
    with pytest.raises(ConfigError, match="--adaround-iterations: AdaRound is a post-training fix"):
        table.resolve(QuantConfig(adaround_iterations=50), pte, qat=True)
    with pytest.raises(ConfigError, match=r"adaround_iterations .*0"):
        QuantConfig(adaround_iterations=0)


def test_a_float_graph_that_is_not_the_quantized_one_is_refused(fmnist):
    """With equalization the float graph quantized is the equalized one: AdaRound given the float graph before
    equalization (whose weights the INT8 ones are not a rounding of) stops instead of learning towards the wrong
    weights."""
    from mbquant.errors import QuantizationError
    from mbquant.quant.export import FloatModel

    graph, int8, batches = _setup(fmnist, "per-tensor")
    model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
    with pytest.raises(QuantizationError, match="not the nearest rounding of its float weights"):
        adaround(int8, FloatModel(model, info.resolution).graph, batches, iterations=1)


def test_the_mcu_graph_int32_biases_and_the_recipe(fmnist):
    """On the Cortex-M graph (per-channel weights, INT32 biases in the graph) through the public API: the recipe turns
    bias correction off when AdaRound runs (measured to lower agreement after it) and times the stage."""
    from mbquant.pipeline import quantize

    model, info = resolve_model("mobilenet_v1", None)
    q = quantize(model, fmnist / "train", info=info, backend="pte-cortex-m",
                 config=QuantConfig(num_calib=32, adaround=True, adaround_iterations=5))
    assert q.config.adaround and q.config.adaround_images == 256 and q.config.bias_correction is False
    assert q.bias_correction is None and q.adaround.samples == 32 and "adaround" in q.seconds
    assert len(q.adaround.layers) == len(_grids(q.int8)) > 10 and q.adaround.skipped_float == []


@pytest.mark.slow
def test_same_seed_same_rounding(fmnist):
    from mbquant.pipeline import quantize

    model, info = resolve_model("mobilenet_v1", None)
    cfg = QuantConfig(num_calib=32, adaround=True, adaround_iterations=5)
    a, b = (quantize(model, fmnist / "train", info=info, backend="pte-cortex-m", config=cfg) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.int8.state_dict().values(), b.int8.state_dict().values()))


@pytest.mark.slow
def test_ptq_with_adaround_writes_a_verified_program(fmnist, tmp_path):
    """`mbquant ptq --adaround` end to end: the rounded graph lowers to a .pte that is opened from its file and
    agrees with the INT8 module; the report keeps the per-layer errors and the stage's seconds."""
    import json

    from mbquant.cli import main

    out = tmp_path / "run"
    assert main(["ptq", "mobilenet_v2", "--weights", "mobilenet_v2_w0.35_r64_fmnist", "--calib", str(fmnist / "train"),
                 "--eval", str(fmnist / "val"), "--num-calib", "64", "--eval-limit", "500", "--adaround",
                 "--adaround-iterations", "20", "--no-float-program", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    b = rep["backends"]["pte-xnnpack"]
    assert b["config"]["adaround"] and not b["config"]["bias_correction"] and b["bias_correction"] is None
    assert b["adaround"]["layers_rounded"] > 40 and len(b["adaround"]["per_layer"]) == 52
    assert b["seconds"]["adaround"] > 0
    (art,) = rep["artifacts"]
    assert rep["status"] == "ok" and art["images"] == 500 and art["parity"]["agreement"] >= 98.0
