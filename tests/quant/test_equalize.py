"""Cross-layer equalization: the float function is unchanged on real images, channel ranges even out, and the
ReLU6 clamp is respected."""
import pytest
import torch
from torch import nn

from mbquant import calibrate
from mbquant.data import small_preset
from mbquant.models import create
from mbquant.quant.equalize import equalize, find_pairs, fold_batchnorm
from mbquant.data.contract import spec_of
from mbquant.models import resolve_model
from tests.mobile.torchscript.test_fuse import nontrivial

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,width", [("mobilenet_v1", 0.25), ("mobilenet_v2", 0.35), ("mobilenet_v3_small", 0.25),
                                        ("resnet18", 1.0)])
def test_equalization_leaves_the_float_model_unchanged(name, width, calib32, small_val):
    torch.manual_seed(0)
    model = nontrivial(create(name, num_classes=10, width_mult=width))
    eq, res = equalize(model, list(calib32.batches(20)))
    val = calibrate.from_folder(small_val, small_preset(32), 100, seed=0).images   # images calibration never saw
    with torch.no_grad():
        assert float((model(val) - eq(val)).abs().max()) < 1e-4
    assert res.pairs == len(find_pairs(fold_batchnorm(model))) and res.max_abs_logit_change < 1e-4


def test_depthwise_ranges_even_out_on_a_trained_checkpoint(fmnist):
    model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
    calib = calibrate.from_folder(fmnist / "train", spec_of(info.preset), 128, seed=0)
    eq, res = equalize(model, list(calib.batches(32)))

    def spread(m):   # per depthwise layer: largest channel range / median channel range
        out = []
        for c in m.modules():
            if isinstance(c, nn.Conv2d) and c.groups > 1:
                r = c.weight.detach().abs().flatten(1).amax(1)
                out.append(float(r.max() / r.median()))
        return sum(out) / len(out)

    assert spread(eq) < 0.7 * spread(fold_batchnorm(model))
    assert res.channels_scaled > 500 and res.channels_kept_for_relu6 > 0   # some ReLU6 channels saturate


def test_relu6_channels_that_reach_the_clamp_are_not_scaled(calib32):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU6()
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.a.weight[0].mul_(100)            # channel 0 saturates at 6: its scale must stay 1
        net.a.weight[1].mul_(0.01)           # channel 1 stays tiny: it may be scaled up
    w0 = net.a.weight[0].clone()
    eq, res = equalize(net, list(calib32.batches(20)))
    assert torch.allclose(eq.a.weight[0], w0) and not torch.allclose(eq.a.weight[1], net.a.weight[1])
    x = calib32.images
    with torch.no_grad():
        assert float((net(x) - eq(x)).abs().max()) < 1e-5
