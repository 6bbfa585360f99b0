"""The bias correction mbquant shipped before it ran in bounded memory: every activation of every calibration batch
kept in memory until its last user has run, the graph evaluated node by node over all batches. Kept here as the
reference the bounded-memory implementation must equal (tests/quant/test_bias_correction.py)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx
from torch.fx import GraphModule, Node

from mbquant.errors import QuantizationError
from mbquant.quant.bias_correction import (BiasCorrectionResult, _attr, _bias_update, channel_mean, folded_reference,
                                           node_means)
from mbquant.quant.ops import CONV_OPS, LINEAR_OPS


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


def correct_biases_in_memory(int8: GraphModule, float_gm: GraphModule, batches: list[torch.Tensor]) -> BiasCorrectionResult:
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
