"""The histogram observers' binning, counted at twice ``torch.histc``'s speed with the same counts.

torchao's (and torch.ao's) ``HistogramObserver`` bins every activation of every calibration batch into 2,048
bins with ``torch.histc``. On CPU that op classifies one element at a time (about 1.8 ns per value with two threads
here), and at 224 px it costs more than the network: 59 % of MobileNetV3-Large's calibration pass, against 33 %
for its convolutions. :func:`histc` computes the same bin of every element with the op's own float32 formula,
``trunc((x - lo) * bins / (hi - lo))`` (the last edge in the last bin), as three vectorised passes over
a reused, cache-sized buffer, and counts with ``torch.bincount``: 0.8-0.9 ns per value, the serial count being most
of it (``benchmarks/scale.py`` measures the whole calibration).

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

import warnings

import torch

from .. import compat

CHUNK = 1 << 20     # values per pass: 4 MB of float32 and 4 MB of int32 scratch, reused (no page faults per batch)


def _countable_width(x: torch.Tensor, bins: int, lo: float, hi: float) -> float | None:
    """The range's float32 width ``hi - lo`` when :func:`histc` reproduces ``torch.histc`` here: float32 CPU values,
    a finite range with room for ``(hi - lo) * bins`` in float32. Else None: ``torch.histc`` itself runs (its own
    errors and edge rules included)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not 0 < bins < 2 ** 24:
        return None
    width = torch.tensor(hi, dtype=torch.float32) - torch.tensor(lo, dtype=torch.float32)
    return float(width) if bool(torch.isfinite(width * bins)) and float(width) > 0 else None


def histc(x: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """``torch.histc(x, bins, lo, hi)`` for values that all lie in ``[lo, hi]`` (an observer's running range holds
    what it bins): float32 counts, the last edge in the last bin. See the module docstring for the one case where
    the counts differ (torch.histc's float32 counters stop at 2 ** 24)."""
    lo, hi = float(lo), float(hi)
    width = _countable_width(x, bins, lo, hi)
    if width is None:
        return torch.histc(x, bins, min=lo, max=hi)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    pos = torch.empty(min(CHUNK, n), dtype=torch.float32)
    index = torch.empty(min(CHUNK, n), dtype=torch.int32)
    counts = torch.zeros(bins + 1, dtype=torch.int64)
    for start in range(0, n, CHUNK):
        part = flat[start:start + CHUNK]
        p, i = pos[:part.numel()], index[:part.numel()]
        torch.sub(part, lo, out=p)                  # the kernel's float32 arithmetic, step by step:
        p.mul_(bins)                                # (x - lo) * bins / (hi - lo), rounded, then truncated
        p.div_(width)                               # (not div's floor mode: that is the exact quotient's floor)
        p.floor_()                                  # (= truncation for x >= lo; a value below lo is refused)
        i.copy_(p)
        part_counts = torch.bincount(i, minlength=bins + 1)
        if part_counts.numel() != bins + 1:
            raise ValueError(f"values above the histogram's range [{lo}, {hi}]; bin values within the range")
        counts += part_counts
    counts[bins - 1] += counts[bins]                # the last edge belongs to the last bin
    return counts[:bins].to(torch.float32)


class CountedHistogram:
    """Mixin for a ``HistogramObserver`` (either family): its ``forward`` with the histogram counted by
    :func:`histc`. Everything else is the base class's, line for line as torchao 0.18 and torch 2.14 write it."""

    def reset_histogram(self, x: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        if min_val.numel() != 1 or max_val.numel() != 1:
            raise AssertionError("histogram min/max values must be scalar.")
        self.min_val.resize_(min_val.shape)
        self.min_val.copy_(min_val)
        self.max_val.resize_(max_val.shape)
        self.max_val.copy_(max_val)
        new_histogram = histc(x, self.bins, min_val, max_val)
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
        update = histc(x, self.bins, new_min, new_max).to(self.histogram.device)
        grew = not (new_min == current_min and new_max == current_max)     # before min_val/max_val change
        if grew:
            combined = compat.combine_histograms(self, self.histogram, current_min, current_max, update,
                                                 new_min, new_max)
        else:
            combined = self.histogram + update
        self.histogram.detach_().resize_(combined.shape)
        self.histogram.copy_(combined)
        if grew:
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
