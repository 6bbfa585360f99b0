"""The Cortex-M program run on the host: its edge graph after the pass manager (the program the ``.pte`` holds),
executed with ExecuTorch's reference implementations of the ``cortex_m::`` ops, batched.

The shipped conv and depthwise kernels requantize in a Python loop over output channels and run the
convolution in int32 (1-2 images/s); :func:`conv` does the same integer arithmetic for a whole batch: the
accumulation exactly in float64 (an int8 x int8 sum over a few thousand terms is far below 2**53), then the
CMSIS-NN requantization (doubling high multiply, rounding right shift) in int64, per channel, vectorised.
Tests check the results are identical to the shipped kernels on real images. This is the host reference of
the device's arithmetic, not the device: the firmware's CMSIS-NN kernels are not run here.
"""
from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn.functional as F

from ..backend import Predictor

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


def conv(x, weight, bias, stride, padding, dilation, input_offset, output_offset, multipliers, shifts, act_min,
         act_max, *, depthwise: bool) -> torch.Tensor:
    """``quantized_conv2d`` (OHWI weights) or ``quantized_depthwise_conv2d`` (IHWO weights), batched."""
    if depthwise:
        w, groups = weight.permute(3, 0, 1, 2), x.shape[1]
    else:
        w, groups = weight.permute(0, 3, 1, 2), x.shape[1] // weight.shape[3]
    acc = F.conv2d(x.to(torch.float64) + int(input_offset), w.to(torch.float64), None, tuple(stride), tuple(padding),
                   tuple(dilation), groups)
    acc = acc.round().to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64).view(1, -1, 1, 1)
    out = requantize(acc, multipliers, shifts) + int(output_offset)
    return out.clamp(int(act_min), int(act_max)).to(torch.int8).contiguous(memory_format=torch.channels_last)


class _Batched(torch.fx.Interpreter):
    """The edge graph on a batch: vectorised conv/depthwise kernels, the shipped ones for everything else."""

    def __init__(self, gm, kernels):
        super().__init__(gm)
        self.kernels = kernels

    def call_function(self, target, args, kwargs):
        fn = self.kernels.get(target)
        if fn is not None:
            return fn(*args)
        return super().call_function(target, args, kwargs)


def batched_graph(program) -> tuple[torch.fx.GraphModule, list]:
    """A copy of the program's graph that takes a batch (the batch-1 ``view_copy`` sizes become -1) and the
    constant inputs in signature order."""
    from executorch.exir.dialects._ops import ops as exir_ops

    gm = copy.deepcopy(program.graph_module)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == exir_ops.edge.aten.view_copy.default and n.args[1][0] == 1:
            n.args = (n.args[0], [-1, *n.args[1][1:]])
    gm.recompile()
    consts = []
    for spec in program.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT":
            consts.append(None)
        else:
            consts.append(program.state_dict[spec.target] if spec.target in program.state_dict
                          else program.constants[spec.target])
    return gm, consts


def kernels() -> dict:
    from executorch.exir.dialects._ops import ops as exir_ops

    cm = exir_ops.edge.cortex_m

    def depthwise(x, w, b, stride, padding, dilation, _mult, *rest):
        return conv(x, w, b, stride, padding, dilation, *rest[:6], depthwise=True)

    return {cm.quantized_conv2d.default: lambda *a: conv(*a[:12], depthwise=False),
            cm.quantized_depthwise_conv2d.default: depthwise}


class HostProgram(Predictor):
    """The lowered Cortex-M program as a predictor (float images in; quantized first when the program takes int8)."""

    runtime = RUNTIME

    def __init__(self, program, input_qparams: dict, int8_input: bool, *, vectorised: bool = True):
        self.gm, self.consts = batched_graph(program)
        self.kernels = kernels() if vectorised else {}
        self.qparams, self.int8_input = input_qparams, int8_input

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qparams
        return torch.ops.quantized_decomposed.quantize_per_tensor(x, q["scale"], q["zero_point"], -128, 127,
                                                                  torch.int8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if self.int8_input:
            x = self.quantize_input(x)
        args = [x if c is None else c for c in self.consts]
        with torch.no_grad():
            out = _Batched(self.gm, self.kernels).run(*args)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float()

    def latency(self, x: torch.Tensor, runs: int, threads: int) -> None:
        return None   # host time of reference kernels says nothing about a microcontroller
