"""Empirical bias correction on a trained shipped checkpoint and real calibration images."""
import torch

from mbquant import calibrate
from mbquant.calibrate.bias_correction import _node_means, correct_biases, folded_reference
from mbquant.config import QuantConfig
from mbquant.quant import ptq
from mbquant.quant.targets import get_target
from mbquant.resolve import resolve_model


def test_bias_correction_removes_the_mean_shift(fmnist):
    model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
    calib = calibrate.from_folder(fmnist / "train", info.preset, 64, seed=0, expected_classes=info.classes)
    prepared = ptq.prepare(model, info.resolution, QuantConfig(num_calib=64), get_target("phone"))
    calibrate.run(prepared, calib)
    int8 = ptq.convert(prepared)
    batches = [b[0] for b in calib.loader(32) if b is not None]
    float_gm = ptq.export_float(model, info.resolution)
    ref = folded_reference(float_gm)
    late = "conv2d_51"  # the last 1x1 conv: errors of all earlier layers have accumulated here
    before = (_node_means(int8, {late}, batches)[late] - _node_means(ref, {late}, batches)[late]).abs().mean()
    res = correct_biases(int8, float_gm, batches)
    after = (_node_means(int8, {late}, batches)[late] - _node_means(ref, {late}, batches)[late]).abs().mean()
    assert res.layers == 53 and res.skipped_no_bias == [] and res.samples == 64   # 52 convs + the classifier
    assert res.max_abs_shift > 0
    assert after < 0.5 * before


def test_reference_has_no_batch_norm_and_matches_float(fmnist):
    model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
    f = ptq.export_float(model, info.resolution)
    ref = folded_reference(f)
    assert not any("batch_norm" in str(n.target) for n in ref.graph.nodes if n.op == "call_function")
    x = torch.randn(2, 3, info.resolution, info.resolution)  # a numerics check of BN folding, not calibration
    with torch.no_grad():
        assert torch.allclose(f(x), ref(x), atol=1e-4)
