"""ATen op sets the graph stages match on (exported and converted PT2E graphs)."""
from __future__ import annotations

import torch

from ..compat import register_decomposed_quant_ops

register_decomposed_quant_ops()   # the quantized_decomposed ops PT2E graphs are made of

_A = torch.ops.aten
_Q = torch.ops.quantized_decomposed

CONV_OPS = {_A.conv2d.default, _A.conv1d.default, _A.convolution.default}
LINEAR_OPS = {_A.linear.default}
HARDTANH_OPS = {_A.hardtanh.default, _A.hardtanh_.default}
BN_OPS = {_A.batch_norm.default, _A._native_batch_norm_legit.default,
          _A._native_batch_norm_legit_no_training.default, _A.cudnn_batch_norm.default}
QUANTIZE_OPS = {_Q.quantize_per_tensor.default, _Q.quantize_per_tensor.tensor, _Q.quantize_per_channel.default}
DEQUANTIZE_OPS = {_Q.dequantize_per_tensor.default, _Q.dequantize_per_tensor.tensor,
                  _Q.dequantize_per_channel.default}
COMPUTE_OPS = {
    *CONV_OPS, *LINEAR_OPS, _A.add.Tensor, _A.add_.Tensor, _A.mul.Tensor, _A.hardswish.default,
    _A.hardswish_.default, _A.hardsigmoid.default, _A.hardsigmoid_.default, _A.adaptive_avg_pool2d.default,
    _A.mean.dim, _A.relu.default, _A.relu_.default, *HARDTANH_OPS, _A.avg_pool2d.default, _A.max_pool2d.default,
    _A.cat.default, _A.sigmoid.default,
}
# identity / layout ops a fused chain may pass through without a quantize between
TRANSPARENT_OPS = {_A.dropout.default, _A.dropout_.default, _A.flatten.using_ints, _A.view.default,
                   _A.reshape.default, _A.clone.default}


def weighted_layers(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The conv and linear nodes of a graph, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_OPS | LINEAR_OPS]


def count_targets(gm: torch.fx.GraphModule, targets: set) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def module_path(node: torch.fx.Node) -> str:
    """The dotted name of the innermost nn.Module a node was traced from ('' when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len("L['self']."):] if path.startswith("L['self'].") else path


def module_paths(node: torch.fx.Node) -> list[str]:
    """Every enclosing module's dotted name, outermost first."""
    out = []
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        out.append(path[len("L['self']."):] if path.startswith("L['self'].") else path)
    return out
