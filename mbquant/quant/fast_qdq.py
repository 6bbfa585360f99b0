"""The converted graph's per-tensor quantize and dequantize, with the same arithmetic in fewer memory passes.

PT2E's ``quantized_decomposed`` ops are written out of place: ``clamp(round(x * (1 / scale)) + zp).to(int8)``
allocates four float tensors the size of the activation, and ``(q.to(float32) - zp) * scale`` two more. At
224 px a MobileNetV2 activation is tens of megabytes per batch, so the in-process INT8 model spent most of its
time allocating (a quantize -> dequantize pair on a 38 M-element tensor: 338 ms; here 132 ms as two functions,
70 ms fused, 2 threads). The
functions below do the same operations in the same order on one buffer (in place after the first), so every
output is bit for bit the op's; ``tests/quant/test_fast_qdq.py`` checks that on half-step values and on whole
models. Anything else (other dtypes, autograd, per-channel ops) runs the original op.

:func:`with_fast_qdq` gives a converted graph that uses them, for in-process evaluation and bias correction;
the graph that is lowered is never changed.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from .ops import _Q

_QUANTIZE = _Q.quantize_per_tensor.default
_DEQUANTIZE = _Q.dequantize_per_tensor.default


def _plain(x: torch.Tensor) -> bool:
    return not (x.requires_grad and torch.is_grad_enabled())


def _onto_grid(y: torch.Tensor, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """The quantize op's steps after ``input * (1 / scale)``, in place on ``y`` (its float grid values)."""
    y.round_()
    y.add_(zero_point)
    return y.clamp_(quant_min, quant_max)


def quantize_per_tensor(input: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """``quantized_decomposed.quantize_per_tensor`` (same result) for a float32 input."""
    if input.dtype != torch.float32 or not _plain(input):
        return _QUANTIZE(input, scale, zero_point, quant_min, quant_max, dtype)
    return _onto_grid(torch.mul(input, 1.0 / scale), zero_point, quant_min, quant_max).to(dtype)


def quantize_per_tensor_(input: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """:func:`quantize_per_tensor` (same result) computed in ``input``'s own buffer, which it overwrites: for a
    caller that knows nothing reads ``input`` again. A new float tensor the size of an activation costs more than
    the arithmetic (page faults: 27 ms against 4 ms for one 26 M-element multiply, 2 threads)."""
    if input.dtype != torch.float32 or not _plain(input):
        return _QUANTIZE(input, scale, zero_point, quant_min, quant_max, dtype)
    return _onto_grid(input.mul_(1.0 / scale), zero_point, quant_min, quant_max).to(dtype)


def dequantize_per_tensor(input: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                          dtype: torch.dtype, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``quantized_decomposed.dequantize_per_tensor`` (same result) for an integer input and a float32 output."""
    if input.is_floating_point() or input.dtype != dtype or out_dtype not in (None, torch.float32) \
            or not _plain(input):
        return _DEQUANTIZE(input, scale, zero_point, quant_min, quant_max, dtype, out_dtype=out_dtype)
    y = input.to(torch.float32)             # a new tensor: the input is an integer tensor
    y.sub_(zero_point)
    y.mul_(scale)
    return y


def quantize_dequantize(input: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_per_tensor(quantize_per_tensor(input, ...), ...)`` with the same parameters (same result), on
    one buffer: the integer grid values between the two are exact in float32 for 8- and 16-bit types."""
    if input.dtype != torch.float32 or not _plain(input) or dtype not in _EXACT:
        return dequantize_per_tensor(quantize_per_tensor(input, scale, zero_point, quant_min, quant_max, dtype),
                                     scale, zero_point, quant_min, quant_max, dtype)
    y = _onto_grid(torch.mul(input, 1.0 / scale), zero_point, quant_min, quant_max)
    y.sub_(zero_point)
    y.mul_(scale)
    return y


_EXACT = (torch.int8, torch.uint8, torch.int16)
FAST: dict[Any, Callable[..., torch.Tensor]] = {_QUANTIZE: quantize_per_tensor, _DEQUANTIZE: dequantize_per_tensor}


def fast(target: Any) -> Any:
    """The function to call for a graph node's ``target`` (the fast version where there is one)."""
    return FAST.get(target, target)


def with_fast_qdq(module: nn.Module) -> nn.Module:
    """``module`` (a converted PT2E graph) as a graph that calls the fast quantize/dequantize, sharing its
    parameters and buffers (a later change to the weights is seen by both). A quantize whose users are
    dequantizes with its parameters becomes one :func:`quantize_dequantize` per user (the integer tensor is not
    kept); bias correction, which keeps integer activations between layers, uses :func:`fast` per node instead.
    Other modules come back unchanged."""
    if not isinstance(module, torch.fx.GraphModule):
        return module
    graph = copy.deepcopy(module.graph)
    swapped = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not _QUANTIZE or n.kwargs:
            continue
        pairs = [u for u in n.users if u.op == "call_function" and u.target is _DEQUANTIZE and not u.kwargs
                 and tuple(u.args[1:]) == tuple(n.args[1:])]
        for dq in pairs:                                         # quantize -> dequantize: one pass over one buffer
            dq.target, dq.args = quantize_dequantize, n.args
            swapped += 1
        if not n.users:
            graph.erase_node(n)
    for n in graph.nodes:
        if n.op == "call_function" and n.target in FAST:
            n.target = FAST[n.target]
            swapped += 1
    if not swapped:
        return module
    out = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
    out.meta.update(module.meta)
    return out
