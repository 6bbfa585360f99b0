"""The Cortex-M program run on the host: the ``.pte``'s own instructions (:mod:`.program`), executed with
ExecuTorch's reference implementations of the ``cortex_m::`` ops, batched.

The shipped conv and depthwise kernels requantize in a Python loop over output channels and run the
convolution in int32 (1-2 images/s); :func:`conv` does the same integer arithmetic for a whole batch: the
accumulation exactly in float32 where every partial sum stays below 2**24 (up to 512 terms: depthwise and most
pointwise layers) and in float64 otherwise (far below 2**53), then the
CMSIS-NN requantization (doubling high multiply, rounding right shift) in int64, per channel, vectorised.
Tests check the results are identical to the shipped kernels on real images. This is the host reference of
the device's arithmetic, not the device: the firmware's CMSIS-NN kernels are not run here.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from ...compat import register_decomposed_quant_ops
from ...errors import VerificationError
from ..backend import Predictor

register_decomposed_quant_ops()

RUNTIME = ("host reference of the cortex_m:: INT8 kernels (ExecuTorch's reference arithmetic, batched); "
           "not the device")


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``arm_nn_requantize`` per channel (dim 1): ((acc << ls) * m + 2**30) >> 31, then a right shift rounding
    half away from zero, as ``requantize_cmsis`` computes it."""
    shape = [1, -1] + [1] * (acc.dim() - 2)
    m = multiplier.to(torch.int64).view(shape)
    s = shift.to(torch.int64).view(shape)
    ls, rs = s.clamp(min=0), (-s).clamp(min=0)
    r = (torch.bitwise_left_shift(acc, ls) * m + (1 << 30)) >> 31
    mask = torch.bitwise_left_shift(torch.ones_like(rs), rs) - 1
    rem = r & mask
    r = torch.bitwise_right_shift(r, rs)
    threshold = (mask >> 1) + (r < 0).to(torch.int64)
    return r + (rem > threshold).to(torch.int64)


# An accumulation of K products of an offset int8 input (|x| <= 256) and an int8 weight (|w| <= 127) is exact in
# float32 when every partial sum stays below 2**24: K <= 512 terms (every depthwise and most pointwise layers);
# larger ones accumulate in float64 (exact below 2**53).
EXACT_FLOAT32_TERMS = (1 << 24) // (256 * 128)


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """oneDNN convolutions in full IEEE float32 (never TF32/BF16 reduced precision) inside the block."""
    conv = torch.backends.mkldnn.conv
    before = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = before


def conv(x, weight, bias, stride, padding, dilation, input_offset, output_offset, multipliers, shifts, act_min,
         act_max, *, depthwise: bool) -> torch.Tensor:
    """``quantized_conv2d`` (OHWI weights) or ``quantized_depthwise_conv2d`` (IHWO weights), batched."""
    if depthwise:
        w, groups = weight.permute(3, 0, 1, 2), x.shape[1]
    else:
        w, groups = weight.permute(0, 3, 1, 2), x.shape[1] // weight.shape[3]
    terms = w.shape[1] * w.shape[2] * w.shape[3]
    dtype = torch.float32 if terms <= EXACT_FLOAT32_TERMS else torch.float64
    with _ieee_float32():
        acc = F.conv2d(x.to(dtype) + int(input_offset), w.to(dtype), None, tuple(stride), tuple(padding),
                       tuple(dilation), groups)
    acc = acc.round().to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64).view(1, -1, 1, 1)
    out = requantize(acc, multipliers, shifts) + int(output_offset)
    return out.clamp(int(act_min), int(act_max)).to(torch.int8).contiguous(memory_format=torch.channels_last)


def mul(x, x_zero_point, y, y_zero_point, out_zero_point, multiplier, shift) -> torch.Tensor:
    """``quantized_mul``, batched: equal shapes, or one operand a per-image channel vector ``[N, C, 1, 1]`` (the
    squeeze-excitation gate; ExecuTorch's reference asserts a broadcast only for one image)."""
    a, b = (x, y) if x.dim() == 4 and x.shape[2:] == (1, 1) else (y, x)
    if x.shape != y.shape and not (a.shape[:2] == b.shape[:2] and a.shape[2:] == (1, 1)):
        raise VerificationError(f"quantized_mul of shapes {list(x.shape)} and {list(y.shape)}: the Cortex-M kernel "
                                f"broadcasts only a channel vector")
    acc = (x.to(torch.int64) - int(x_zero_point)) * (y.to(torch.int64) - int(y_zero_point))
    out = (requantize(acc, torch.tensor([multiplier]), torch.tensor([shift])) + int(out_zero_point)).clamp(-128, 127)
    return out.to(torch.int8).contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out.to(torch.int8)


def kernels() -> dict[str, object]:
    """The batched conv, depthwise and multiply kernels, by operator name (the rest run ExecuTorch's reference
    ops)."""
    def depthwise(x, w, b, stride, padding, dilation, _mult, *rest):
        return conv(x, w, b, stride, padding, dilation, *rest[:6], depthwise=True)

    return {"cortex_m::quantized_conv2d": lambda *a: conv(*a[:12], depthwise=False),
            "cortex_m::quantized_depthwise_conv2d": depthwise,
            "cortex_m::quantized_mul": mul}


class HostProgram(Predictor):
    """A Cortex-M ``.pte`` (its bytes) as a predictor: float images in (quantized first with the input's scale and
    zero point when the program takes int8), logits out. ``vectorised=False`` runs ExecuTorch's own reference
    kernels everywhere (slow; the tests compare both)."""

    runtime = RUNTIME

    def __init__(self, data: bytes, input_qparams: dict, *, source: str, vectorised: bool = True):
        from .program import CortexMProgram

        self.program = CortexMProgram(data, source=source, kernels=kernels() if vectorised else {})
        self.int8_input = self.program.input_spec.dtype == torch.int8
        if self.int8_input and not input_qparams.get("scale"):
            raise VerificationError(f"'{source}' takes int8 images but its sidecar gives no input scale and zero "
                                    f"point; keep the sidecar mbquant wrote beside it")
        self.qparams = input_qparams

    @property
    def operators(self) -> list[str]:
        return self.program.operators

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qparams
        return torch.ops.quantized_decomposed.quantize_per_tensor(x, q["scale"], q["zero_point"], -128, 127,
                                                                  torch.int8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if self.int8_input:
            x = self.quantize_input(x)
        out = self.program.run(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float()

    def latency(self, x: torch.Tensor, runs: int, threads: int) -> None:
        return None   # host time of reference kernels says nothing about a microcontroller
