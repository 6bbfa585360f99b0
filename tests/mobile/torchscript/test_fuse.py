"""Eager fusion (mbquant.mobile.torchscript.fuse): same float outputs, the expected fused structure, ReLU6 kept."""
import pytest
import torch
import torch.ao.nn.intrinsic as nni
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from mbquant import calibrate
from mbquant.data import small_preset
from mbquant.errors import QuantizationError
from mbquant.mobile.torchscript.fuse import (ConvBnReLU62d, ConvReLU62d, FusedBasicBlock, FusedBottleneck,
                                            FusedInvertedResidual, FusedInvertedResidualV3, FusedSqueezeExcitation,
                                            fuse)
from mbquant.models import available_models, create

RES = 32
WIDTH = {"mobilenet_v1": 0.25, "mobilenet_v2": 0.35, "mobilenet_v3_small": 0.35, "mobilenet_v3_large": 0.25,
         "resnet18": 1.0, "resnet50": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def nontrivial(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters (so folding BN changes the weights), default-initialised
    linear layers (so the logits are not ~0), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
    return model.eval()


def zoo(name: str) -> nn.Module:
    torch.manual_seed(0)
    return nontrivial(create(name, num_classes=10, width_mult=WIDTH[name]))


@pytest.fixture(scope="module")
def images(small_folder):
    calib = calibrate.from_folder(small_folder, small_preset(RES), 16, seed=0)
    return calib.images


def count(model: nn.Module, cls) -> int:
    return sum(type(m) is cls for m in model.modules())


def bare(model: nn.Module, cls) -> int:
    """Modules of type ``cls`` that are not inside a fused unit."""
    fused = [n for n, m in model.named_modules() if isinstance(m, nni._FusedModule)]
    return sum(type(m) is cls and not any(n.startswith(f + ".") for f in fused) for n, m in model.named_modules())


@pytest.mark.parametrize("name", available_models())
@pytest.mark.parametrize("fuse_relu6", [True, False])
def test_fused_float_model_gives_the_same_outputs(name, fuse_relu6, images):
    model = zoo(name)
    with torch.no_grad():
        ref = model(images)
        fused = fuse(model, fuse_relu6=fuse_relu6)(images)
        fused_qat = fuse(model, is_qat=True, fuse_relu6=fuse_relu6).eval()(images)
    assert ref.abs().max() > 0.05  # logits that mean something
    assert (fused - ref).abs().max() < 1e-4
    assert (fused_qat - ref).abs().max() < 1e-4


@pytest.mark.parametrize("name", available_models())
def test_no_batchnorm_left_and_input_untouched(name):
    model = zoo(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse(model)
    assert count(fused, nn.BatchNorm2d) == 0 and not fused.training
    assert count(model, nn.BatchNorm2d) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    qat = fuse(model, is_qat=True)
    assert qat.training and bare(qat, nn.BatchNorm2d) == 0  # BN lives on inside ConvBn units for QAT


def test_mobilenet_v1_conv_bn_relu6_units():
    fused = fuse(zoo("mobilenet_v1"))
    assert count(fused, ConvReLU62d) == 27 and count(fused, nn.ReLU) == 0
    assert all(type(m[1]) is nn.ReLU6 for m in fused.modules() if type(m) is ConvReLU62d)


def test_mobilenet_v2_relu6_modes_and_residual_adds():
    model = zoo("mobilenet_v2")
    residual = sum(getattr(m, "use_res_connect", False) for m in model.modules())
    clamp, separate, qat = fuse(model), fuse(model, fuse_relu6=False), fuse(model, is_qat=True)
    assert count(clamp, ConvReLU62d) == 35 and bare(clamp, nn.ReLU6) == 0
    assert count(separate, ConvReLU62d) == 0 and count(separate, nn.ReLU6) == 35
    assert count(qat, ConvBnReLU62d) == 35 and count(qat, nni.ConvBn2d) == residual + 7  # pw-linear conv-BN units
    for fused in (clamp, separate, qat):
        assert count(fused, nn.ReLU) == 0  # ReLU6 never becomes ReLU
        blocks = [m for m in fused.modules() if type(m) is FusedInvertedResidual]
        assert residual == 10 and len(blocks) == residual
        assert all(type(b.skip_add) is FloatFunctional for b in blocks)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_mobilenet_v3_hardswish_squeeze_excitation_and_adds(name):
    model = zoo(name)
    residual = sum(getattr(m, "use_res_connect", False) for m in model.modules())
    ses = sum(type(m).__name__ == "SqueezeExcitation" for m in model.modules())
    fused = fuse(model)
    se = [m for m in fused.modules() if type(m) is FusedSqueezeExcitation]
    assert len(se) == ses > 0
    assert all(type(m.fc1) is nni.ConvReLU2d and type(m.scale_activation) is nn.Hardsigmoid
               and type(m.skip_mul) is FloatFunctional for m in se)
    assert count(fused, FusedInvertedResidualV3) == residual > 0
    assert count(fused, nn.Hardswish) == count(model, nn.Hardswish) > 0
    assert count(fused, nni.ConvReLU2d) == count(model, nn.ReLU)  # every ReLU (SE and blocks) fused into its conv


def test_resnet_blocks_fuse_and_add_relu():
    r18, r50 = fuse(zoo("resnet18")), fuse(zoo("resnet50"))
    basic = [m for m in r18.modules() if type(m) is FusedBasicBlock]
    bottleneck = [m for m in r50.modules() if type(m) is FusedBottleneck]
    assert len(basic) == 8 and len(bottleneck) == 16
    assert all(type(b.conv1) is nni.ConvReLU2d and type(b.conv2) is nn.Conv2d and type(b.skip_add_relu) is FloatFunctional
               for b in basic)
    assert all(type(b.conv2) is nni.ConvReLU2d and type(b.conv3) is nn.Conv2d for b in bottleneck)
    assert type(r18.conv1) is nni.ConvReLU2d and bare(r18, nn.ReLU) == 0


def test_unfusable_batchnorm_is_an_error():
    odd = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(QuantizationError, match="BatchNorm2d.*first: '0'.*PT2E"):
        fuse(odd)
