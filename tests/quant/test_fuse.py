"""conv(-BN)-ReLU6 fusion in the PT2E quantizer."""
import pytest
import torch
from torch import nn

from mbquant.config import QuantConfig
from mbquant.models import create
from mbquant.quant import ptq
from mbquant.quant.fuse import is_relu6, match_conv_relu6
from mbquant.quant.graph import summarize
from mbquant.quant.targets import get_target


def _converted(model, fuse, res=32):
    prepared = ptq.prepare(model, res, QuantConfig(fuse_relu6=fuse, observer="minmax"), get_target("phone"))
    with torch.no_grad():
        prepared(torch.linspace(-2, 2, 2 * 3 * res * res).reshape(2, 3, res, res))
    return ptq.convert(prepared)


def test_relu6_fusion_removes_a_quantize_per_unit_and_keeps_relu6():
    model = create("mobilenet_v2", num_classes=10, width_mult=0.35)
    fused, stock = summarize(_converted(model, True)), summarize(_converted(model, False))
    assert (fused.fused_conv_relu6, stock.fused_conv_relu6) == (35, 0)
    assert stock.quantize - fused.quantize == 35   # no q/dq between conv and its ReLU6
    assert fused.unfused_relu6 == 0 and stock.unfused_relu6 == 35   # ReLU6 kept, never swapped for ReLU


def test_fused_relu6_output_range_is_non_negative():
    model = create("mobilenet_v2", num_classes=10, width_mult=0.35)
    q = _converted(model, True)
    zero_points = []
    for n in q.graph.nodes:
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
def test_only_exact_relu6_bounds_fuse(lo, hi, fused):
    assert summarize(_converted(Clamp(lo, hi), True, res=8)).fused_conv_relu6 == fused


def test_qat_graph_shape_conv_bn_relu6_matches():
    model = create("mobilenet_v2", num_classes=10, width_mult=0.35).train()
    gm = torch.export.export(model, (torch.zeros(2, 3, 32, 32),)).module()
    matches = [match_conv_relu6(n) for n in gm.graph.nodes]
    matches = [m for m in matches if m is not None]
    assert len(matches) == 35 and all(between for _, between in matches)  # BN sits between conv and ReLU6


def test_float_logits_leaves_only_the_classifier_in_float():
    model = create("mobilenet_v2", num_classes=10, width_mult=0.35)
    prepared = ptq.prepare(model, 32, QuantConfig(float_logits=True, observer="minmax"), get_target("phone"))
    with torch.no_grad():
        prepared(torch.linspace(-2, 2, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32))
    q = ptq.convert(prepared)
    s = summarize(q)
    assert len(s.float_ops) == 1 and s.float_ops[0].startswith("linear") and "classifier.1" in s.float_ops[0]
    out = next(n for n in q.graph.nodes if n.op == "output").args[0][0]
    assert "linear" in str(out.target)            # logits come straight from the fp32 classifier
    w = out.args[1]
    assert w.op == "get_attr"                       # its weights are fp32, not dequantized INT8
