"""Structure checks on exported / converted graphs: op counts, BN left, fused units, float ops."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from .fuse import BN_OPS, CONV_OPS, is_relu6

QUANTIZE_OPS = {
    torch.ops.quantized_decomposed.quantize_per_tensor.default,
    torch.ops.quantized_decomposed.quantize_per_tensor.tensor,
    torch.ops.quantized_decomposed.quantize_per_channel.default,
}
DEQUANTIZE_OPS = {
    torch.ops.quantized_decomposed.dequantize_per_tensor.default,
    torch.ops.quantized_decomposed.dequantize_per_tensor.tensor,
    torch.ops.quantized_decomposed.dequantize_per_channel.default,
}
_A = torch.ops.aten
COMPUTE_OPS = {
    *CONV_OPS, _A.linear.default, _A.add.Tensor, _A.add_.Tensor, _A.mul.Tensor, _A.hardswish.default,
    _A.hardswish_.default, _A.hardsigmoid.default, _A.hardsigmoid_.default, _A.adaptive_avg_pool2d.default,
    _A.mean.dim, _A.relu.default, _A.relu_.default, _A.hardtanh.default, _A.hardtanh_.default,
    _A.avg_pool2d.default, _A.max_pool2d.default, _A.cat.default, _A.sigmoid.default,
}

# identity / layout ops a fused chain may pass through without a quantize between
TRANSPARENT_OPS = {_A.dropout.default, _A.dropout_.default, _A.flatten.using_ints, _A.view.default,
                   _A.reshape.default, _A.clone.default}


def op_name(node: Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)) if not hasattr(t, "_schema") else str(t).replace("aten.", "")


def count_targets(gm: GraphModule, targets: set) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def _through_single_users(node: Node, forward: bool) -> Node | None:
    """Follow a fused chain (single-user compute ops) backwards or forwards to the first non-compute node."""
    seen = 0
    cur = node
    while seen < 8:
        seen += 1
        if forward:
            if len(cur.users) != 1:
                return None
            nxt = next(iter(cur.users))
        else:
            args = [a for a in cur.args if isinstance(a, Node)]
            if not args:
                return None
            nxt = args[0]
        if nxt.op == "call_function" and nxt.target in COMPUTE_OPS | TRANSPARENT_OPS:
            if not forward and len(nxt.users) != 1:
                return nxt
            cur = nxt
            continue
        return nxt
    return None


@dataclass
class GraphSummary:
    """What convert produced: BN left, q/dq counts, fused conv-ReLU6 units and ops that stayed in float."""

    batch_norm: int
    quantize: int
    dequantize: int
    conv: int
    fused_conv_relu6: int
    unfused_relu6: int
    float_ops: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(gm: GraphModule) -> GraphSummary:
    fused = unfused = 0
    float_ops: list[str] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if is_relu6(n):
            src = n.args[0]
            if isinstance(src, Node) and src.target in CONV_OPS and len(src.users) == 1:
                fused += 1
            else:
                unfused += 1
        if n.target in COMPUTE_OPS and not _is_quantized(n):
            stack = n.meta.get("nn_module_stack") or {}
            where = list(stack.values())[-1][0] if stack else ""
            float_ops.append(f"{n.name} ({op_name(n)}{', ' + where if where else ''})")
    return GraphSummary(
        batch_norm=count_targets(gm, BN_OPS), quantize=count_targets(gm, QUANTIZE_OPS),
        dequantize=count_targets(gm, DEQUANTIZE_OPS), conv=count_targets(gm, CONV_OPS),
        fused_conv_relu6=fused, unfused_relu6=unfused, float_ops=float_ops)


def _is_quantized(node: Node) -> bool:
    """True when the op reads dequantized INT8 input and its result (possibly through a fused
    single-user chain) is quantized again, or is dequantize-shared (e.g. pooling sharing qparams)."""
    acts = [a for a in node.args if isinstance(a, Node) and a.op != "get_attr"]
    if not acts:
        return True
    reads_q = any(a.target in DEQUANTIZE_OPS for a in acts if a.op == "call_function")
    if not reads_q:
        prev = _through_single_users(node, forward=False)
        reads_q = prev is not None and prev.op == "call_function" and prev.target in DEQUANTIZE_OPS
    users = list(node.users)
    writes_q = any(u.op == "call_function" and u.target in QUANTIZE_OPS for u in users)
    if not writes_q:
        nxt = _through_single_users(node, forward=True)
        writes_q = nxt is not None and nxt.op == "call_function" and nxt.target in QUANTIZE_OPS
    return reads_q and writes_q

