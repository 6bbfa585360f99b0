"""The model zoo: which architectures mbquant builds (its own MobileNetV1; torchvision's MobileNetV2/V3 and
ResNets), how each is built in float, and what a forward pass costs (parameters, MACs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelError
from .info import MODEL_NAMES
from .mobilenet_v1 import MobileNetV1


@dataclass(frozen=True)
class ZooEntry:
    build: Callable[..., nn.Module]
    has_width: bool
    torchvision_name: str | None  # name for torchvision.models.get_model_weights


def _tv(name: str, has_width: bool) -> ZooEntry:
    def build(num_classes: int, width_mult: float, **_: Any) -> nn.Module:
        import torchvision

        kwargs: dict[str, Any] = {"num_classes": num_classes}
        if has_width:
            kwargs["width_mult"] = width_mult
        return torchvision.models.get_model(name, weights=None, **kwargs)

    return ZooEntry(build, has_width, name)


def _v1(num_classes: int, width_mult: float, rho: float = 1.0, **_: Any) -> nn.Module:
    return MobileNetV1(num_classes=num_classes, alpha=width_mult, rho=rho)


ZOO: dict[str, ZooEntry] = {
    "mobilenet_v1": ZooEntry(_v1, True, None),
    "mobilenet_v2": _tv("mobilenet_v2", True),
    "mobilenet_v3_small": _tv("mobilenet_v3_small", True),
    "mobilenet_v3_large": _tv("mobilenet_v3_large", True),
    "resnet18": _tv("resnet18", False),
    "resnet50": _tv("resnet50", False),
}


def available_models() -> list[str]:
    return list(MODEL_NAMES)


def entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ModelError(f"unknown model '{name}'; available: {', '.join(ZOO)}")
    return ZOO[name]


def rho_for(name: str, resolution: int) -> float:
    """MobileNetV1's resolution multiplier for an input size (it records ``default_resolution``); 1 for the rest."""
    return resolution / 224 if name == "mobilenet_v1" else 1.0


def build(name: str, *, num_classes: int, width_mult: float = 1.0, rho: float = 1.0) -> nn.Module:
    """A freshly initialised float model of the zoo (eval mode)."""
    return entry(name).build(num_classes=num_classes, width_mult=width_mult, rho=rho).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-accumulates of one forward pass (conv and linear layers) at ``resolution``."""
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        macs += out.numel() // out.shape[0] * k

    def lin_hook(m: nn.Linear, _inp, out):
        nonlocal macs
        macs += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(lin_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, resolution, resolution))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs
