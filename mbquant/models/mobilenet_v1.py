"""MobileNetV1 (Howard et al., 2017): mbquant's own implementation, with width multiplier ``alpha`` and resolution
multiplier ``rho`` (torchvision has no V1)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError


class ConvBNAct(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU6 (or ReLU): the unit that quantization fuses."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1, act: str = "relu6"):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True) if act == "relu6" else nn.ReLU(inplace=True),
        )


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: 3x3 depthwise conv-BN-act, then 1x1 pointwise conv-BN-act."""

    def __init__(self, cin: int, cout: int, stride: int, act: str = "relu6"):
        super().__init__()
        self.dw = ConvBNAct(cin, cin, 3, stride, groups=cin, act=act)
        self.pw = ConvBNAct(cin, cout, 1, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


# (output channels, stride) of the 13 depthwise-separable blocks, Table 1 of the paper
_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al., 2017) with width multiplier ``alpha`` and resolution multiplier ``rho``.

    ``rho`` does not change the weights; it sets ``default_resolution = round(224 * rho)``.
    """

    def __init__(self, num_classes: int = 1000, alpha: float = 1.0, rho: float = 1.0,
                 dropout: float = 0.001, act: str = "relu6"):
        super().__init__()
        if not 0 < alpha <= 4:
            raise ModelError(f"mobilenet_v1 width multiplier alpha={alpha} is out of range; use 0 < alpha <= 4 (e.g. 0.25, 0.5, 1.0)")
        if not 0 < rho <= 4:
            raise ModelError(f"mobilenet_v1 resolution multiplier rho={rho} is out of range; use 0 < rho <= 4 (e.g. 96/224)")
        self.alpha, self.rho = alpha, rho
        self.default_resolution = round(224 * rho)

        def ch(c: int) -> int:
            return max(8, int(c * alpha))

        layers: list[nn.Module] = [ConvBNAct(3, ch(32), 3, 2, act=act)]
        cin = ch(32)
        for cout, stride in _V1_BLOCKS:
            layers.append(DepthwiseSeparable(cin, ch(cout), stride, act=act))
            cin = ch(cout)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
