"""Structure checks on converted PT2E graphs: BN left, q/dq counts, fused conv-ReLU6 units, ops left in float."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch.fx import GraphModule, Node

from .ops import (BN_OPS, COMPUTE_OPS, CONV_OPS, DEQUANTIZE_OPS, LINEAR_OPS, QUANTIZE_OPS, TRANSPARENT_OPS,
                  count_targets, module_path)
from .relu6 import is_relu6


def op_name(node: Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)) if not hasattr(t, "_schema") else str(t).replace("aten.", "")


def _through_single_users(node: Node, forward: bool) -> Node | None:
    """Follow a fused chain (single-user compute ops) backwards or forwards to the first non-compute node."""
    cur = node
    for _ in range(8):
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
    float_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(gm: GraphModule) -> GraphSummary:
    fused = unfused = 0
    float_ops: list[str] = []
    float_layers: list[str] = []
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
            where = module_path(n)
            float_ops.append(f"{n.name} ({op_name(n)}{', ' + where if where else ''})")
            if where and where not in float_layers:
                float_layers.append(where)
    return GraphSummary(
        batch_norm=count_targets(gm, BN_OPS), quantize=count_targets(gm, QUANTIZE_OPS),
        dequantize=count_targets(gm, DEQUANTIZE_OPS), conv=count_targets(gm, CONV_OPS),
        fused_conv_relu6=fused, unfused_relu6=unfused, float_ops=float_ops, float_layers=float_layers)


def _is_quantized(node: Node) -> bool:
    """True when the op reads dequantized INT8 input (and, for conv/linear, dequantized INT8 weights) and its
    result (possibly through a fused single-user chain) is quantized again, or is dequantize-shared (e.g. pooling
    sharing qparams)."""
    if node.target in CONV_OPS | LINEAR_OPS:
        weight = node.args[1]
        if not (isinstance(weight, Node) and weight.op == "call_function" and weight.target in DEQUANTIZE_OPS):
            return False
    acts = [a for a in node.args if isinstance(a, Node) and a.op != "get_attr"]
    if not acts:
        return True
    reads_q = any(a.target in DEQUANTIZE_OPS for a in acts if a.op == "call_function")
    if not reads_q:
        prev = _through_single_users(node, forward=False)
        reads_q = prev is not None and prev.op == "call_function" and prev.target in DEQUANTIZE_OPS
    writes_q = any(u.op == "call_function" and u.target in QUANTIZE_OPS for u in node.users)
    if not writes_q:
        nxt = _through_single_users(node, forward=True)
        writes_q = nxt is not None and nxt.op == "call_function" and nxt.target in QUANTIZE_OPS
    return reads_q and writes_q
