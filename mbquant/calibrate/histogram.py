"""The histogram observers' binning, counted at more than twice ``torch.histc``'s speed with the same counts.

torchao's (and torch.ao's) ``HistogramObserver`` bins every activation of every calibration batch into 2,048
bins with ``torch.histc``. On CPU that op classifies one element at a time (about 1.8 ns per value with two threads
here), and at 224 px it costs more than the network: 59 % of MobileNetV3-Large's calibration pass, against 33 %
for its convolutions. :func:`histc` computes the same bin of every element with the op's own float32 formula,
``trunc((x - lo) * bins / (hi - lo))`` (the last edge in the last bin), in vectorised passes over a reused,
cache-sized buffer, and counts with ``torch.bincount``:

* two float passes, not three: with a power-of-two bin count, ``(x - lo) / (width / bins)`` is the same number as
  the kernel's ``(x - lo) * bins / width`` (see :func:`_count`);
* the bin indices in int16 (2,048 bins fit), converted by truncation as the kernel casts;
* four interleaved sub-histograms (:func:`_lane_offsets`): ``torch.bincount`` is serial, and the run of zeros after
  a ReLU, all in one bin, made each of its adds wait for the one before.

On MobileNetV3-Large's twelve largest activations at 224 px (batch 32) that is 0.7-0.8 ns per value against
1.4-1.8 ns for the previous counted histogram (three float passes, int32 indices, one histogram) in the same runs,
and against 1.8-2.0 ns for ``torch.histc`` (``benchmarks/scale.py`` measures the whole calibration).

The counts are ``torch.histc``'s whenever it counts right. Its CPU kernel keeps one float32 histogram per thread,
and a float32 counter stops at 2 ** 24: with one thread, ``torch.histc(torch.zeros(20_000_000), 2048, 0, 1)[0]``
is 16,777,216. :func:`histc` counts in int64 and rounds each total once to float32, as torch's sum of the
threads' histograms does when no thread's count passed 2 ** 24; past that, it counts what torch.histc drops.
(A bin that large needs 2 ** 24 equal-binned values in one thread's share of one batch: MobileNetV2's largest
activation at 224 px holds 38.5 M values per batch of 32.)

:class:`CountedHistogram` is the observer's ``forward`` with that binning and nothing else changed: the same
running range, the same merge of histograms when the range grows (the base class's own method), so the same
histogram, the same ranges and the same quantized model. ``compat``'s probe checks that against the installed
observer on every test run.
"""
from __future__ import annotations

import functools
import math
import struct
import warnings

import torch

from .. import compat

CHUNK = 1 << 20     # values per pass: 4 MB of float32 and 2-4 MB of integer scratch, reused within a call
LANES = 4           # sub-histograms counted side by side (see _lane_offsets)


def _f32(v: float) -> float:
    """``v`` rounded to float32 (to nearest, ties to even; inf past float32's range), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def _countable_width(x: torch.Tensor, bins: int, lo: float, hi: float) -> float | None:
    """The range's float32 width ``hi - lo`` when :func:`histc` reproduces ``torch.histc`` here: float32 CPU values,
    a finite range with room for ``(hi - lo) * bins`` in float32. Else None: ``torch.histc`` itself runs (its own
    errors and edge rules included).

    Float32 arithmetic in Python floats: a float64 sum or product of two float32 values, rounded to float32, is the
    float32 operation's result (a 53-bit format holds 2 * 24 + 2 bits, so the double rounding is innocuous), and it
    costs no tensor ops (the observer asks once per batch per activation)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not 0 < bins < 2 ** 24 // LANES:
        return None
    width = _f32(_f32(hi) - _f32(lo))
    return width if math.isfinite(_f32(width * bins)) and width > 0 else None


def _index_dtype(bins: int) -> torch.dtype:
    """The narrowest integer type that holds every sub-histogram's bin index (int16 for torchao's 2,048 bins:
    half the bytes for the conversion, the offsets and bincount's three reads of them)."""
    return torch.int16 if LANES * (bins + 1) <= torch.iinfo(torch.int16).max else torch.int32


@functools.lru_cache(maxsize=8)
def _lane_offsets(bins: int) -> torch.Tensor:
    """``[0, b, 2b, 3b, 0, b, ...]`` (``b = bins + 1``), CHUNK values: adding them to consecutive bin indices sends
    neighbours to different sub-histograms. ``torch.bincount`` adds one at a time, and a run of values in one bin
    (the zeros after a ReLU: half of an activation) makes each add wait for the one before it; four interleaved
    sub-histograms break that chain (about 2x faster on post-ReLU values here). A constant, read only."""
    return ((torch.arange(CHUNK) % LANES) * (bins + 1)).to(_index_dtype(bins))


def histc(x: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """``torch.histc(x, bins, lo, hi)`` for values that all lie in ``[lo, hi]`` (a value outside is refused): float32
    counts, the last edge in the last bin. See the module docstring for the one case where the counts differ
    (torch.histc's float32 counters stop at 2 ** 24)."""
    lo, hi = float(lo), float(hi)
    if x.numel() and _countable_width(x, bins, lo, hi) is not None:
        x_min, x_max = (float(v) for v in torch.aminmax(x.detach()))
        if not _f32(lo) <= x_min <= x_max <= _f32(hi):       # the edges as the kernel sees them (float32)
            raise ValueError(f"values [{x_min}, {x_max}] outside the histogram's range [{lo}, {hi}]; "
                             "bin values within the range")
    return _count(x, bins, lo, hi)


def _count(x: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """:func:`histc` for a caller that knows every value lies in ``[lo, hi]`` (an observer whose running range came
    from the same ``aminmax``): no pass of its own to check it."""
    lo, hi = float(lo), float(hi)
    width = _countable_width(x, bins, lo, hi)
    if width is None:
        return torch.histc(x, bins, min=lo, max=hi)
    lo = _f32(lo)                                   # the kernel's edges are in the input's dtype
    # torch.histc's float32 formula is (x - lo) * bins / width, rounded at each step. With a power-of-two bin count
    # the product is exact, and so is width / bins when it is a normal float: (x - lo) / (width / bins) rounds the
    # same real number once, as the kernel's division does. One pass fewer; other bin counts take all three steps.
    step = width / bins
    exact_step = bins & (bins - 1) == 0 and step >= torch.finfo(torch.float32).tiny
    flat = x.detach().reshape(-1)
    n = flat.numel()
    pos = torch.empty(min(CHUNK, n), dtype=torch.float32)
    lanes = _lane_offsets(bins)
    index = torch.empty(min(CHUNK, n), dtype=lanes.dtype)
    counts = torch.zeros(LANES * (bins + 1), dtype=torch.int64)
    for start in range(0, n, CHUNK):
        part = flat[start:start + CHUNK]
        m = part.numel()
        p, i = pos[:m], index[:m]
        torch.sub(part, lo, out=p)                  # the kernel's float32 arithmetic (not div's floor mode: that
        if exact_step:                              # is the exact quotient's floor)
            p.div_(step)
        else:
            p.mul_(bins)
            p.div_(width)
        i.copy_(p)                                  # truncation = the kernel's cast (every value is >= lo)
        i.add_(lanes[:m])
        counts += torch.bincount(i, minlength=LANES * (bins + 1))
    counts = counts.view(LANES, bins + 1).sum(0)
    counts[bins - 1] += counts[bins]                # the last edge belongs to the last bin
    return counts[:bins].to(torch.float32)


class CountedHistogram:
    """Mixin for a ``HistogramObserver`` (either family): its ``forward`` with the histogram counted by
    :func:`histc`. Everything else is the base class's as torchao 0.18 and torch 2.14 write it: the same steps,
    the same state after every batch (range comparisons on Python floats, and the histogram summed in place when
    the range held, where the base class compares 0-d tensors and copies a new sum: the same values)."""

    def reset_histogram(self, x: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        if min_val.numel() != 1 or max_val.numel() != 1:
            raise AssertionError("histogram min/max values must be scalar.")
        self.min_val.resize_(min_val.shape)
        self.min_val.copy_(min_val)
        self.max_val.resize_(max_val.shape)
        self.max_val.copy_(max_val)
        new_histogram = _count(x, self.bins, min_val, max_val)
        self.histogram.detach_().resize_(new_histogram.shape)
        self.histogram.copy_(new_histogram)

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach()
        x_min, x_max = torch.aminmax(x)
        if x_min == -torch.inf or x_max == torch.inf:
            warnings.warn("torch.inf detected in input tensor, ignoring input", stacklevel=2)
            x = x[x.abs() != torch.inf]
            if x.numel() == 0:
                return x_orig
            x_min, x_max = torch.aminmax(x)
        current_min, current_max = self.min_val, self.max_val
        if self.min_val == float("inf") or self.max_val == float("-inf"):
            self.reset_histogram(x, x_min, x_max)
            return x_orig
        new_min = torch.min(current_min, x_min).detach()
        new_max = torch.max(current_max, x_max).detach()
        lo, hi = float(new_min), float(new_max)
        update = _count(x, self.bins, lo, hi).to(self.histogram.device)
        if lo == float(current_min) and hi == float(current_max):     # the range held: the base's sum, in place
            self.histogram.add_(update)
            return x_orig
        combined = compat.combine_histograms(self, self.histogram, current_min, current_max, update, new_min, new_max)
        self.histogram.detach_().resize_(combined.shape)
        self.histogram.copy_(combined)
        self.min_val.detach_().resize_(new_min.shape)
        self.min_val.copy_(new_min)
        self.max_val.detach_().resize_(new_max.shape)
        self.max_val.copy_(new_max)
        return x_orig


def uncounted(observer: type) -> type:
    """``observer``'s class without :class:`CountedHistogram`: the same observer counting with ``torch.histc``
    (benchmarks and tests compare the two on the same graph)."""
    if not issubclass(observer, CountedHistogram):
        return observer
    bases = tuple(uncounted(b) for b in observer.__bases__ if b is not CountedHistogram)
    namespace = {k: v for k, v in vars(observer).items() if k not in ("__dict__", "__weakref__")}
    return type(f"Uncounted{observer.__name__}", bases, namespace)
