"""conv(-BN)-ReLU6 fusion in a PT2E graph (the Relu6Fusion annotator composed before XNNPACK's quantizer)."""
import pytest
import torch
from torch import nn

from mbquant import calibrate
from mbquant.data import small_preset
from mbquant.models import create
from mbquant.quant.graph import summarize
from mbquant.quant.relu6 import is_relu6, match_conv_relu6
from tests.conftest import quantize_pt2e


def _converted(model, fuse, calib, res=32):
    return quantize_pt2e(model, res, calib, fuse_relu6=fuse, observer="minmax", keep_float=(),
                         bias_correction=False).int8


@pytest.fixture(scope="module")
def v2_pair(calib32):
    model = create("mobilenet_v2", num_classes=10, width_mult=0.35)
    return _converted(model, True, calib32), _converted(model, False, calib32)


def test_relu6_fusion_removes_a_quantize_per_unit_and_keeps_relu6(v2_pair):
    fused, stock = summarize(v2_pair[0]), summarize(v2_pair[1])
    assert (fused.fused_conv_relu6, stock.fused_conv_relu6) == (35, 0)
    assert stock.quantize - fused.quantize == 35   # no q/dq between conv and its ReLU6
    assert fused.unfused_relu6 == 0 and stock.unfused_relu6 == 35   # ReLU6 kept, never swapped for ReLU


def test_fused_relu6_output_range_is_non_negative(v2_pair):
    zero_points = []
    for n in v2_pair[0].graph.nodes:
        if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target):
            if is_relu6(n.args[0]):
                zero_points.append(int(n.args[2]))
    assert len(zero_points) == 35 and all(z == -128 for z in zero_points)  # range starts at 0: all codes used


class Clamp(nn.Module):
    def __init__(self, lo, hi):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return torch.clamp(nn.functional.hardtanh(self.conv(x), self.lo, self.hi), -10, 10)


@pytest.mark.parametrize("lo,hi,fused", [(0.0, 6.0, 1), (-1.0, 1.0, 0), (0.0, 4.0, 0)])
def test_only_exact_relu6_bounds_fuse(small_folder, lo, hi, fused):
    calib = calibrate.from_folder(small_folder, small_preset(8), 8, seed=0)
    assert summarize(_converted(Clamp(lo, hi), True, calib, res=8)).fused_conv_relu6 == fused


def test_qat_graph_shape_conv_bn_relu6_matches():
    model = create("mobilenet_v2", num_classes=10, width_mult=0.35).train()
    gm = torch.export.export(model, (torch.zeros(2, 3, 32, 32),)).module()
    matches = [match_conv_relu6(n) for n in gm.graph.nodes]
    matches = [m for m in matches if m is not None]
    assert len(matches) == 35 and all(between for _, between in matches)  # BN sits between conv and ReLU6
