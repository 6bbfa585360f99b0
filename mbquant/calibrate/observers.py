"""Activation observers offered by ``--observer`` and the quantization spec built from a QuantConfig."""
from __future__ import annotations

import torch
from torchao.quantization.pt2e import (FusedMovingAvgObsFakeQuantize, HistogramObserver, MinMaxObserver,
                                       MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
                                       PerChannelMinMaxObserver)
from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

from ..config import QuantConfig

EPS = 2 ** -12  # as ExecuTorch's XNNPACK quantizer


class PercentileObserver(HistogramObserver):
    """A histogram observer whose range is the [100 - p, p] percentiles of what it saw.

    Clipping the rare extreme activations trades a little clipping error for finer steps everywhere
    else. The lower bound is clipped only when negative values were seen (post-ReLU ranges keep 0).
    """

    def __init__(self, percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        self.percentile = float(percentile)

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self.histogram.double()
        total = hist.sum()
        if total <= 0:
            return self.min_val, self.max_val
        cdf = torch.cumsum(hist, 0) / total
        width = (self.max_val - self.min_val) / self.bins
        q = self.percentile / 100.0
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)).clamp(max=self.bins - 1))
        new_max = self.min_val + width * (hi_bin + 1)
        new_min = self.min_val
        if self.min_val < 0:
            lo_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - q, dtype=cdf.dtype)))
            new_min = torch.minimum(self.min_val + width * lo_bin, torch.zeros_like(self.min_val))
        return new_min.to(self.min_val.dtype), torch.maximum(new_max, torch.zeros_like(new_max)).to(self.max_val.dtype)


def activation_observer(config: QuantConfig):
    """The observer constructor for activations named by ``config.observer``."""
    if config.observer == "histogram":
        return HistogramObserver.with_args(eps=EPS)
    if config.observer == "minmax":
        return MinMaxObserver.with_args(eps=EPS)
    if config.observer == "moving-average":
        return MovingAverageMinMaxObserver.with_args(eps=EPS, averaging_constant=0.01)
    return PercentileObserver.with_args(eps=EPS, percentile=config.percentile)


def quantization_config(config: QuantConfig, *, qat: bool = False) -> QuantizationConfig:
    """INT8 spec for XNNPACK: per-tensor affine activations, symmetric weights (per-channel by default).

    With ``qat`` every observer becomes a fused moving-average fake-quantize (as ExecuTorch's QAT config),
    keeping the weight granularity: per-channel weights get a per-channel moving-average observer.
    """
    per_channel = config.granularity == "per-channel"
    if qat:
        act_ctr = FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=EPS)
        w_obs = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
        w_ctr = FusedMovingAvgObsFakeQuantize.with_args(observer=w_obs, eps=EPS)
    else:
        act_ctr = activation_observer(config)
        w_ctr = (PerChannelMinMaxObserver if per_channel else MinMaxObserver).with_args(eps=EPS)
    act = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
                           is_dynamic=False, observer_or_fake_quant_ctr=act_ctr)
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric, ch_axis=0,
        is_dynamic=False, observer_or_fake_quant_ctr=w_ctr)
    return QuantizationConfig(act, act, weight, None, qat)
