"""Empirical bias correction of a converted INT8 graph (Nagel et al. 2019, as in NNCF's PTQ).

Quantizing weights and inputs shifts the mean of each conv/linear output channel. For every layer
in graph order, mbquant measures that shift on the calibration images, E[y_int8] - E[y_float], and
subtracts it from the layer's float bias (XNNPACK requantizes the bias when it lowers the graph).
Layers are corrected one after another, so each correction sees the already-corrected layers
before it. The reference is the float model with BN folded exactly as ``prepare_pt2e`` folds it,
so both graphs have the same node names.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.fx import GraphModule, Node

from ..errors import QuantizationError
from ..quant.fuse import CONV_OPS

LINEAR_OPS = {torch.ops.aten.linear.default}


@dataclass
class BiasCorrectionResult:
    layers: int
    skipped_no_bias: list[str] = field(default_factory=list)
    max_abs_shift: float = 0.0
    samples: int = 0

    def to_dict(self) -> dict:
        return {"layers_corrected": self.layers, "skipped_no_bias": self.skipped_no_bias,
                "max_abs_shift": round(self.max_abs_shift, 6), "samples": self.samples}


def folded_reference(float_gm: GraphModule) -> GraphModule:
    """The float exported graph with BN folded into the convs (node names as in the prepared graph)."""
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    ref = copy.deepcopy(float_gm)
    _fuse_conv_bn_(ref)
    ref.recompile()
    return ref


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=(0, 2, 3)) if t.dim() == 4 else t.reshape(-1, t.shape[-1]).mean(0)


class _StopAt(Exception):
    """Raised inside the interpreter once the layer of interest has run: the rest of the graph is not needed."""


def _node_means(gm: GraphModule, names: set[str], batches: list[torch.Tensor], stop_after: str | None = None):
    """Per-channel output means of ``names`` over ``batches`` (an Interpreter that may stop early)."""
    sums: dict[str, torch.Tensor] = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                m = _channel_mean(out.detach()) * out.shape[0]
                sums[n.name] = sums.get(n.name, 0) + m
                if n.name == stop_after:
                    raise _StopAt
            return out

    total = 0
    with torch.no_grad():
        for x in batches:
            try:
                Rec(gm).run(x)
            except _StopAt:
                pass
            total += x.shape[0]
    return {k: v / total for k, v in sums.items()}


def _bias_tensor(gm: GraphModule, node: Node) -> torch.Tensor | None:
    bias = node.args[2] if len(node.args) > 2 else None
    if not isinstance(bias, Node) or bias.op != "get_attr":
        return None
    obj = gm
    for part in bias.target.split("."):
        obj = getattr(obj, part)
    return obj


def correct_biases(int8: GraphModule, float_gm: GraphModule, batches: list[torch.Tensor]) -> BiasCorrectionResult:
    """Correct the biases of ``int8`` in place, layer by layer, on the calibration ``batches``."""
    if not batches:
        raise QuantizationError("bias correction needs calibration images; none were given")
    ref = folded_reference(float_gm)
    layers = [n for n in int8.graph.nodes if n.op == "call_function" and n.target in CONV_OPS | LINEAR_OPS]
    ref_names = {n.name for n in ref.graph.nodes}
    missing = [n.name for n in layers if n.name not in ref_names]
    if missing:
        raise QuantizationError(f"bias correction: {len(missing)} layers of the INT8 graph have no float counterpart "
                                f"(first: {missing[0]}); run without bias correction")
    float_means = _node_means(ref, {n.name for n in layers}, batches)
    result = BiasCorrectionResult(0, samples=sum(int(x.shape[0]) for x in batches))
    for node in layers:
        bias = _bias_tensor(int8, node)
        if bias is None:
            result.skipped_no_bias.append(node.name)
            continue
        q_mean = _node_means(int8, {node.name}, batches, stop_after=node.name)[node.name]
        shift = q_mean - float_means[node.name]
        with torch.no_grad():
            bias.sub_(shift.to(bias.dtype))
        result.layers += 1
        result.max_abs_shift = max(result.max_abs_shift, float(shift.abs().max()))
    int8.recompile()
    return result
