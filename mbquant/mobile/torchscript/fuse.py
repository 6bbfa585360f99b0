"""Eager fusion for the legacy ``torch.ao.quantization`` engine (the TorchScript backend only).

``fuse(model, is_qat=..., fuse_relu6=...)`` returns a fused deep copy; the input is untouched. What it does to
the zoo's structures:

* every Conv2d -> BatchNorm2d [-> ReLU] run inside an nn.Sequential (mbquant ConvBNAct, torchvision
  Conv2dNormActivation, the pw-linear conv+BN of InvertedResidual, ResNet downsample) goes through
  ``torch.ao.quantization.fuse_modules`` (eval: BN folded into the conv) or ``fuse_modules_qat`` (train:
  ConvBn modules that keep BN trainable);
* Conv2d -> BatchNorm2d -> ReLU6 becomes ``ConvReLU62d`` (eval) / ``ConvBnReLU62d`` (QAT) with ``fuse_relu6``:
  one quantized unit whose single output observer sees the clamped values, so the INT8 output grid spans
  [0, m] with m <= 6 and the quantized module still applies ReLU6 explicitly. Without it only conv+BN are
  fused and ``nn.ReLU6`` stays a module of its own (quantized on the conv's grid). ReLU6 never becomes ReLU;
* residual blocks get wrapper modules whose forward adds through ``FloatFunctional`` (ResNet: ``add_relu``),
  squeeze-excitation multiplies through ``FloatFunctional.mul``; Hardswish/Hardsigmoid stay.
"""
from __future__ import annotations

import copy as _copy

import torch
import torch.ao.nn.intrinsic as _nni
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from ...errors import QuantizationError


class ConvReLU62d(_nni._FusedModule):
    """Conv2d (BN already folded) -> ReLU6, quantized as one unit (output observer after the clamp)."""

    def __init__(self, conv: nn.Conv2d, relu6: nn.ReLU6):
        if type(conv) is not nn.Conv2d or type(relu6) is not nn.ReLU6:
            raise QuantizationError(f"ConvReLU62d fuses nn.Conv2d + nn.ReLU6, got {type(conv).__name__} + "
                                    f"{type(relu6).__name__}")
        super().__init__(conv, relu6)


class ConvBnReLU62d(_nni._FusedModule):
    """Conv2d -> BatchNorm2d -> ReLU6 for QAT (BN trains, is folded at convert)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: nn.ReLU6):
        if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or type(relu6) is not nn.ReLU6:
            raise QuantizationError(f"ConvBnReLU62d fuses nn.Conv2d + nn.BatchNorm2d + nn.ReLU6, got "
                                    f"{type(conv).__name__} + {type(bn).__name__} + {type(relu6).__name__}")
        super().__init__(conv, bn, relu6)


def _fuse_conv_bn_relu6(is_qat: bool, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: nn.ReLU6) -> nn.Module:
    if is_qat:
        return ConvBnReLU62d(conv, bn, relu6)
    return ConvReLU62d(nn.utils.fuse_conv_bn_eval(conv, bn), relu6)


def _fuse_conv_relu6(is_qat: bool, conv: nn.Conv2d, relu6: nn.ReLU6) -> nn.Module:
    return ConvReLU62d(conv, relu6)


RELU6_FUSERS = {(nn.Conv2d, nn.BatchNorm2d, nn.ReLU6): _fuse_conv_bn_relu6, (nn.Conv2d, nn.ReLU6): _fuse_conv_relu6}


def _fuse_list(mods: list[nn.Module], is_qat: bool) -> nn.Module:
    """Fuse one run of modules (``fuse_known_modules``, the function ``fuse_modules`` applies per run)."""
    from torch.ao.quantization.fuse_modules import fuse_known_modules

    return fuse_known_modules(mods, is_qat, RELU6_FUSERS)[0]


def conv_runs(seq: nn.Sequential, fuse_relu6: bool) -> list[list[str]]:
    """Names of the Conv2d [-> BatchNorm2d] [-> ReLU | ReLU6 (clamp mode)] runs among ``seq``'s children."""
    items = list(seq.named_children())
    acts = (nn.ReLU, nn.ReLU6) if fuse_relu6 else (nn.ReLU,)
    runs, i = [], 0
    while i < len(items):
        if type(items[i][1]) is not nn.Conv2d:
            i += 1
            continue
        run, j = [items[i][0]], i + 1
        if j < len(items) and type(items[j][1]) is nn.BatchNorm2d:
            run.append(items[j][0])
            j += 1
        if j < len(items) and type(items[j][1]) in acts:
            run.append(items[j][0])
            j += 1
        if len(run) > 1:
            runs.append(run)
        i = j
    return runs


def _fuse_sequential(seq: nn.Sequential, is_qat: bool, fuse_relu6: bool) -> None:
    from torch.ao.quantization import fuse_modules, fuse_modules_qat

    runs = conv_runs(seq, fuse_relu6)
    if runs:
        (fuse_modules_qat if is_qat else fuse_modules)(
            seq, runs, inplace=True, fuse_custom_config_dict={"additional_fuser_method_mapping": RELU6_FUSERS})


class FusedInvertedResidual(nn.Module):
    """A residual torchvision MobileNetV2 InvertedResidual: ``x + conv(x)`` through a quantizable add."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv = block.conv
        self.skip_add = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_add.add(x, self.conv(x))


class FusedInvertedResidualV3(nn.Module):
    """A residual torchvision MobileNetV3 InvertedResidual: ``block(x) + x`` through a quantizable add."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block.block
        self.skip_add = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_add.add(self.block(x), x)


class FusedSqueezeExcitation(nn.Module):
    """torchvision SqueezeExcitation: fc1+ReLU fused, Hardsigmoid kept, ``scale * x`` through a quantizable mul."""

    def __init__(self, se: nn.Module, is_qat: bool):
        super().__init__()
        if type(se.activation) is not nn.ReLU or type(se.scale_activation) not in (nn.Hardsigmoid, nn.Sigmoid):
            raise QuantizationError(f"squeeze-excitation with {type(se.activation).__name__}/"
                                    f"{type(se.scale_activation).__name__} is not supported by the eager path; "
                                    f"supported: ReLU then Hardsigmoid or Sigmoid (torchvision MobileNetV3)")
        self.avgpool = se.avgpool
        self.fc1 = _fuse_list([se.fc1, se.activation], is_qat)
        self.fc2 = se.fc2
        self.scale_activation = se.scale_activation
        self.skip_mul = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.fc1(self.avgpool(x))))
        return self.skip_mul.mul(scale, x)


class FusedBasicBlock(nn.Module):
    """torchvision ResNet BasicBlock: conv-BN-ReLU, conv-BN, then add+ReLU through ``FloatFunctional.add_relu``."""

    def __init__(self, b: nn.Module, is_qat: bool):
        super().__init__()
        self.conv1 = _fuse_list([b.conv1, b.bn1, _copy.deepcopy(b.relu)], is_qat)
        self.conv2 = _fuse_list([b.conv2, b.bn2], is_qat)
        self.downsample = b.downsample if b.downsample is not None else nn.Identity()
        self.skip_add_relu = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_add_relu.add_relu(self.conv2(self.conv1(x)), self.downsample(x))


class FusedBottleneck(nn.Module):
    """torchvision ResNet Bottleneck: three fused conv units, then add+ReLU through ``FloatFunctional.add_relu``."""

    def __init__(self, b: nn.Module, is_qat: bool):
        super().__init__()
        self.conv1 = _fuse_list([b.conv1, b.bn1, _copy.deepcopy(b.relu)], is_qat)
        self.conv2 = _fuse_list([b.conv2, b.bn2, _copy.deepcopy(b.relu)], is_qat)
        self.conv3 = _fuse_list([b.conv3, b.bn3], is_qat)
        self.downsample = b.downsample if b.downsample is not None else nn.Identity()
        self.skip_add_relu = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_add_relu.add_relu(self.conv3(self.conv2(self.conv1(x))), self.downsample(x))


def _wrap(child: nn.Module, is_qat: bool) -> nn.Module | None:
    """The quantizable replacement of a known block (its subtree already fused), or None."""
    from torchvision.models import mobilenetv2, mobilenetv3, resnet
    from torchvision.ops.misc import SqueezeExcitation

    if isinstance(child, mobilenetv2.InvertedResidual):
        return FusedInvertedResidual(child) if child.use_res_connect else None
    if isinstance(child, mobilenetv3.InvertedResidual):
        return FusedInvertedResidualV3(child) if child.use_res_connect else None
    if isinstance(child, SqueezeExcitation):
        return FusedSqueezeExcitation(child, is_qat)
    if isinstance(child, resnet.BasicBlock):
        return FusedBasicBlock(child, is_qat)
    if isinstance(child, resnet.Bottleneck):
        return FusedBottleneck(child, is_qat)
    return None


def _fuse_tree(module: nn.Module, is_qat: bool, fuse_relu6: bool) -> None:
    from torchvision.models import ResNet

    if isinstance(module, nn.Sequential):
        _fuse_sequential(module, is_qat, fuse_relu6)
    if isinstance(module, ResNet):
        module.conv1 = _fuse_list([module.conv1, module.bn1, module.relu], is_qat)
        module.bn1, module.relu = nn.Identity(), nn.Identity()
    for name, child in list(module.named_children()):
        if isinstance(child, _nni._FusedModule):
            continue
        _fuse_tree(child, is_qat, fuse_relu6)
        wrapped = _wrap(child, is_qat)
        if wrapped is not None:
            setattr(module, name, wrapped)


def unfused_batchnorms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm2d modules left outside a fused unit."""
    fused = {n for n, m in model.named_modules() if isinstance(m, _nni._FusedModule)}
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and not any(n.startswith(f + ".") for f in fused)]


def fuse(model: nn.Module, *, is_qat: bool = False, fuse_relu6: bool = True) -> nn.Module:
    """A fused deep copy of ``model`` for the eager engine (eval mode; train mode with ``is_qat``).

    ``fuse_relu6``: conv(-BN)-ReLU6 is one unit, quantized after the clamp; without it conv-BN are fused and
    ReLU6 quantized on its own. Raises QuantizationError when a BatchNorm2d cannot be fused.
    """
    fused = _copy.deepcopy(model).train(is_qat)
    _fuse_tree(fused, is_qat, fuse_relu6)
    left = unfused_batchnorms(fused)
    if left:
        raise QuantizationError(f"{len(left)} BatchNorm2d modules follow no Conv2d that eager fusion can fold "
                                f"(first: '{left[0]}'); eager fusion knows Sequential conv-BN(-act) runs and the "
                                f"zoo's blocks ({type(model).__name__} is not one of them): use the PT2E path")
    return fused
