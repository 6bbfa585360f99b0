"""Empirical bias correction of a converted INT8 graph (Nagel et al. 2019, as in NNCF's PTQ), in one pass.

Quantizing weights and inputs shifts the mean of each conv/linear output channel. mbquant measures that
shift on the calibration images, E[y_int8] - E[y_float], and subtracts it from the layer's float bias
(XNNPACK requantizes the bias when it lowers the graph). Layers are corrected in graph order and each
correction sees the already-corrected layers before it: the INT8 graph runs once, node by node over all
calibration batches (each live activation is kept for every batch until its last user has run), and at
every conv/linear the shift is measured, the bias corrected and the layer's output recomputed before the
next node runs. The float means come from one pass of the reference: the float graph with BN folded exactly
as ``prepare_pt2e`` folds it, so both graphs have the same node names.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx
from torch.fx import GraphModule, Node

from ..errors import QuantizationError
from .ops import CONV_OPS, DEQUANTIZE_OPS, LINEAR_OPS


@dataclass
class BiasCorrectionResult:
    layers_corrected: int
    skipped_no_bias: list[str] = field(default_factory=list)
    max_abs_shift: float = 0.0
    samples: int = 0

    def to_dict(self) -> dict:
        return {"layers_corrected": self.layers_corrected, "skipped_no_bias": self.skipped_no_bias,
                "max_abs_shift": round(self.max_abs_shift, 6), "samples": self.samples}


def folded_reference(float_gm: GraphModule) -> GraphModule:
    """A copy of the float exported graph with BN folded into the convs (node names as in the prepared graph)."""
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    ref = copy.deepcopy(float_gm)
    _fuse_conv_bn_(ref)
    ref.recompile()
    return ref


def channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=(0, 2, 3)) if t.dim() == 4 else t.reshape(-1, t.shape[-1]).mean(0)


def node_means(gm: GraphModule, names: set[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel output means of the nodes ``names`` over ``batches`` (one pass)."""
    sums: dict[str, torch.Tensor] = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                sums[n.name] = sums.get(n.name, 0) + channel_mean(out.detach()) * out.shape[0]
            return out

    with torch.no_grad():
        for x in batches:
            Rec(gm).run(x)
    total = sum(int(x.shape[0]) for x in batches)
    return {k: v / total for k, v in sums.items()}


def _attr(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _bias_update(gm: GraphModule, bias: Node | None) -> Callable[[torch.Tensor], None] | None:
    """How to subtract a per-channel shift from a layer's bias: a float bias (``get_attr``), or an INT32 bias
    dequantized in the graph (``dequantize(int32 get_attr, scale)``: the shift is rounded onto its grid, as the
    backend's kernel adds it). None when the layer has no bias to correct."""
    if not isinstance(bias, Node):
        return None
    if bias.op == "get_attr" and _attr(gm, bias.target).is_floating_point():
        t = _attr(gm, bias.target)
        return lambda shift: t.sub_(shift.to(t.dtype))
    if bias.op == "call_function" and bias.target in DEQUANTIZE_OPS and isinstance(bias.args[0], Node) \
            and bias.args[0].op == "get_attr":
        q = _attr(gm, bias.args[0].target)
        scale = bias.args[1]
        scale = _attr(gm, scale.target) if isinstance(scale, Node) else torch.tensor(float(scale))
        if q.dtype != torch.int32:
            return None

        def apply(shift: torch.Tensor) -> None:
            step = scale.to(torch.float64).reshape(-1) if scale.numel() > 1 else scale.to(torch.float64)
            q.sub_(torch.round(shift.to(torch.float64) / step).to(torch.int32))

        return apply
    return None


def run_layerwise(gm: GraphModule, batches: list[torch.Tensor],
                  visit: Callable[[Node, Callable[[], list], Callable[[Node], None]], list] | None = None) -> list:
    """Run ``gm`` node by node over every batch; ``visit(node, compute, refresh)`` sees each call_function node and
    returns its per-batch outputs (``compute()`` evaluates the node, again after a change; ``refresh(n)``
    re-evaluates an earlier node ``n`` whose constant inputs changed). Returns the outputs."""
    env: dict[Node, list] = {}
    left = {n: len(n.users) for n in gm.graph.nodes}

    def value(a, b):
        if a.op == "get_attr":
            return _attr(gm, a.target)
        return env[a][b]

    def evaluate(node: Node) -> list:
        fn = node.target if node.op == "call_function" else gm.get_submodule(node.target)
        return [fn(*torch.fx.node.map_arg(node.args, lambda a: value(a, b)),
                   **torch.fx.node.map_arg(node.kwargs, lambda a: value(a, b))) for b in range(len(batches))]

    def refresh(node: Node) -> None:
        if node in env:
            env[node] = evaluate(node)

    result: list = []
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = list(batches)
            elif node.op in ("call_function", "call_module"):
                if visit is not None and node.op == "call_function":
                    env[node] = visit(node, lambda node=node: evaluate(node), refresh)
                else:
                    env[node] = evaluate(node)
            elif node.op == "output":
                result = [torch.fx.node.map_arg(node.args[0], lambda a: value(a, b)) for b in range(len(batches))]
            elif node.op != "get_attr":
                raise QuantizationError(f"bias correction runs exported graphs; node {node.name} is a {node.op}")
            for inp in node.all_input_nodes:
                left[inp] -= 1
                if left[inp] == 0 and inp in env:
                    del env[inp]
    return result


def correct_biases(int8: GraphModule, float_gm: GraphModule, batches: list[torch.Tensor]) -> BiasCorrectionResult:
    """Correct the biases of ``int8`` in place, in graph order, on the calibration ``batches`` (one pass)."""
    if not batches:
        raise QuantizationError("bias correction needs calibration images; none were given")
    ref = folded_reference(float_gm)
    layers = {n.name for n in int8.graph.nodes if n.op == "call_function" and n.target in CONV_OPS | LINEAR_OPS}
    ref_names = {n.name for n in ref.graph.nodes}
    missing = sorted(layers - ref_names)
    if missing:
        raise QuantizationError(f"bias correction: {len(missing)} layers of the INT8 graph have no float counterpart "
                                f"(first: {missing[0]}); run without bias correction")
    float_means = node_means(ref, layers, batches)
    total = sum(int(x.shape[0]) for x in batches)
    result = BiasCorrectionResult(0, samples=total)

    def visit(node: Node, compute: Callable[[], list], refresh: Callable[[Node], None]) -> list:
        outs = compute()
        if node.name not in layers:
            return outs
        bias = node.args[2] if len(node.args) > 2 else None
        apply = _bias_update(int8, bias)
        if apply is None:
            result.skipped_no_bias.append(node.name)
            return outs
        q_mean = sum(channel_mean(o) * o.shape[0] for o in outs) / total
        shift = q_mean - float_means[node.name]
        apply(shift)
        refresh(bias)   # an INT32 bias reaches the layer through its dequantize, computed before the change
        result.layers_corrected += 1
        result.max_abs_shift = max(result.max_abs_shift, float(shift.abs().max()))
        return compute()

    run_layerwise(int8, list(batches), visit)
    int8.recompile()
    return result
