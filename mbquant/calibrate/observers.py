"""Activation observers (``--observer``) for every engine, and the PT2E quantization spec of a QuantConfig.

One factory, :func:`activation_observer`, builds the observer for either observer family: torchao's PT2E
observers (``torchao.quantization.pt2e``, the default) or the legacy eager engine's (``torch.ao.quantization``,
passed in by the TorchScript backend). The percentile rule is written once (:class:`PercentileRange`) and
mixed into each family's histogram observer.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

from ..config import QuantConfig
from .histogram import CountedHistogram

EPS = 2 ** -12  # as ExecuTorch's XNNPACK quantizer


class PercentileRange:
    """Mixin for a histogram observer: the range is the [100 - p, p] percentiles of what it saw.

    Clipping the rare extreme activations trades a little clipping error for finer steps everywhere
    else. The lower bound is clipped only when negative values were seen (post-ReLU ranges keep 0).
    """

    def __init__(self, percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        self.percentile = float(percentile)

    def percentile_range(self) -> tuple[torch.Tensor, torch.Tensor]:
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


def _pt2e() -> ModuleType:
    import torchao.quantization.pt2e as ns

    return ns


@functools.cache
def histogram_observer(base: type) -> type:
    """The histogram observer of one observer family (its HistogramObserver), counting with
    :class:`~mbquant.calibrate.histogram.CountedHistogram`: the same histogram, twice as fast."""
    return type("HistogramObserver", (CountedHistogram, base), {"__module__": __name__, "__doc__": base.__doc__})


@functools.cache
def percentile_observer(base: type) -> type:
    """The percentile observer of one observer family (its HistogramObserver with :class:`PercentileRange`, counting
    with :class:`~mbquant.calibrate.histogram.CountedHistogram`)."""
    from ..compat import PARAM_SEARCH

    return type("PercentileObserver", (PercentileRange, CountedHistogram, base),
                {"__module__": __name__, "__doc__": PercentileRange.__doc__,
                 PARAM_SEARCH: PercentileRange.percentile_range})   # the hook calculate_qparams calls


def activation_observer(config: QuantConfig, ns: ModuleType | None = None, **kwargs):
    """The observer constructor (``with_args``) for activations named by ``config.observer``, from the observer
    family ``ns`` (default: torchao's PT2E observers). ``kwargs`` go to the observer (dtype, range)."""
    ns = ns or _pt2e()
    kwargs = {"eps": EPS, **kwargs}
    if config.observer == "histogram":
        return histogram_observer(ns.HistogramObserver).with_args(**kwargs)
    if config.observer == "minmax":
        return ns.MinMaxObserver.with_args(**kwargs)
    if config.observer == "moving-average":
        return ns.MovingAverageMinMaxObserver.with_args(averaging_constant=0.01, **kwargs)
    if config.observer == "percentile":
        return percentile_observer(ns.HistogramObserver).with_args(percentile=config.percentile, **kwargs)
    raise ValueError(f"observer {config.observer!r} is not resolved; resolve the config for its backend first")


def qat_activation(observer: type, **kwargs):
    """QAT's activation fake-quantize (``with_args``): the fused moving-average one, one pass over a large tensor.
    Its kernel's affine step is its observer's, the one ``convert_pt2e`` writes, to a float32 rounding."""
    return _pt2e().FusedMovingAvgObsFakeQuantize.with_args(observer=observer, **kwargs)


def qat_weight(observer: type, ns: ModuleType | None = None, **kwargs):
    """QAT's weight fake-quantize (``with_args``) from the observer family ``ns`` (default: torchao's PT2E one; the
    TorchScript engine passes ``torch.ao.quantization``): the unfused one. Its step is its observer's formula, the one
    post-training quantization and ``convert_pt2e`` use, so training starts on PTQ's weight grid and the converted
    weights are the ones trained. The fused kernel's symmetric step is not its observer's (torchao 0.18: ``absmax /
    127.5`` against ``absmax / 127`` for [-127, 127]; ``max(|min| / 128, max / 127)`` against ``absmax / 127.5`` for
    [-128, 127]), so QAT with it trained on a grid 0.4 % off the one it converted to (fixed upstream by
    pytorch/ao#4824, not in the pinned torchao). Weights are small: the unfused op costs nothing that shows."""
    return (ns or _pt2e()).FakeQuantize.with_args(observer=observer, **kwargs)


def quantization_config(config: QuantConfig, *, qat: bool = False):
    """INT8 spec for PT2E backends: per-tensor affine activations, symmetric weights in [-127, 127] (per-channel
    by default). With ``qat`` the observers are moving-average fake-quantizes (:func:`qat_activation`,
    :func:`qat_weight`), keeping the weight granularity: per-channel weights get a per-channel moving-average
    observer."""
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    ns = _pt2e()
    per_channel = config.granularity == "per-channel"
    if qat:
        act_ctr = qat_activation(ns.MovingAverageMinMaxObserver, eps=EPS)
        w_obs = ns.MovingAveragePerChannelMinMaxObserver if per_channel else ns.MovingAverageMinMaxObserver
        w_ctr = qat_weight(w_obs, eps=EPS)
    else:
        act_ctr = activation_observer(config)
        w_ctr = (ns.PerChannelMinMaxObserver if per_channel else ns.MinMaxObserver).with_args(eps=EPS)
    act = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
                           is_dynamic=False, observer_or_fake_quant_ctr=act_ctr)
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric, ch_axis=0,
        is_dynamic=False, observer_or_fake_quant_ctr=w_ctr)
    return QuantizationConfig(act, act, weight, None, qat)
