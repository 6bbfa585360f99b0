"""The histogram observers' binning: ``torch.histc``'s counts in one fused native pass on torch's threads.

torchao's (and torch.ao's) ``HistogramObserver`` bins every activation of every calibration batch into 2,048
bins with ``torch.histc``. On CPU that op classifies one element at a time (about 1.8 ns per value with two threads
here), and at 224 px it costs more than the network: 59 % of MobileNetV3-Large's calibration pass, against 33 %
for its convolutions. :func:`histc` computes the same bin of every element with the op's own float32 formula,
``trunc((x - lo) * bins / (hi - lo))`` (the last edge in the last bin), and counts it in one fused pass of
mbquant's one compiled module (``_count.c``, plain C with OpenMP):

* each of torch's OpenMP threads (``torch.get_num_threads()`` of them) bins its share of the values a cache-sized
  block at a time (vectorised: IEEE division and truncation round the same at any vector width) and counts the
  block at once into its own histograms; the totals are integers, so they do not depend on the number of threads;
* with a power-of-two bin count, ``(x - lo) / (width / bins)`` is the same number as the kernel's
  ``(x - lo) * bins / width`` (see :func:`_count`): one rounding step, not two;
* four interleaved sub-histograms per thread: a run of values in one bin (the zeros after a ReLU: half of an
  activation) would otherwise make each add wait for the one before.

With two threads that is 0.35 ns per value on one 7 M-value post-ReLU activation, and 0.45 ns inside
MobileNetV3-Large's calibration pass at 224 px (227 M values per batch of 32), against 1.21 ns for the previous
count in torch ops (a float pass per step, an int16 cast, the serial ``torch.bincount``) in the same pass and
1.8-2.0 ns for ``torch.histc`` (``benchmarks/scale.py`` measures the whole calibration).

The counts are ``torch.histc``'s whenever it counts right. Its CPU kernel keeps one float32 histogram per thread,
and a float32 counter stops at 2 ** 24: with one thread, ``torch.histc(torch.zeros(20_000_000), 2048, 0, 1)[0]``
is 16,777,216. :func:`histc` counts in int64 and rounds each total once to float32, as torch's sum of the
threads' histograms does when no thread's count passed 2 ** 24; past that, it counts what torch.histc drops.
(A bin that large needs 2 ** 24 equal-binned values in one thread's share of one batch: MobileNetV2's largest
activation at 224 px holds 38.5 M values per batch of 32.) Anything the compiled count cannot reproduce (not
float32, not on the CPU, a range whose width overflows) goes to ``torch.histc`` itself, as before.

:class:`CountedHistogram` is the observer's ``forward`` with that binning and nothing else changed: the same
running range, the same merge of histograms when the range grows (the base class's own method), so the same
histogram, the same ranges and the same quantized model. ``compat``'s probe checks that against the installed
observer on every test run.
"""
from __future__ import annotations

import math
import struct
import warnings

import torch

from .. import compat

try:
    from . import _count as _native
except ImportError as e:          # a checkout used without installing it: say how to build the count
    raise ImportError(f"mbquant's compiled histogram count (mbquant/calibrate/_count.c) is not built ({e}); install "
                      "mbquant with pip on a machine with a C compiler: `pip install -e .` in a checkout, or "
                      "`make setup`") from e

MAX_BINS = (1 << 24) - 1         # _count.c's bound: every bin index and bins + 1 are exact float32 integers


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
    if x.dtype != torch.float32 or x.device.type != "cpu" or not 0 < bins <= MAX_BINS:
        return None
    width = _f32(_f32(hi) - _f32(lo))
    return width if math.isfinite(_f32(width * bins)) and width > 0 else None


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
    # same real number once, as the kernel's division does. Other bin counts take all three steps.
    step = width / bins
    exact_step = bins & (bins - 1) == 0 and step >= torch.finfo(torch.float32).tiny
    counts = torch.zeros(bins + 1, dtype=torch.int64)
    outside = _native.count(_flat(x.detach()).numpy(), counts.numpy(), lo, step if exact_step else float(bins),
                            width, exact_step, bins, torch.get_num_threads())
    if outside:
        raise ValueError(f"{outside} values outside the histogram's range [{lo}, {hi}] (or not numbers); bin values "
                         "within the range")
    counts[bins - 1] += counts[bins]                # the last edge belongs to the last bin
    return counts[:bins].to(torch.float32)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` as one contiguous row, without a copy when ``x`` is dense in either memory format (a count
    does not care in which order it meets them)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)
    return x.contiguous().view(-1)


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
