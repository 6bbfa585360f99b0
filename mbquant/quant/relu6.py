"""Conv(-BN)-ReLU6 as one quantized unit in a PT2E graph (a quantizer that annotates only that pattern).

The stock XNNPACK quantizer annotates conv+ReLU as one unit but lets ReLU6 (``hardtanh(0, 6)``) merely
share its input's qparams: the conv output is quantized over its full signed range and half the INT8
codes are wasted after the clamp. :class:`Relu6Fusion` annotates conv -> [BN ->] hardtanh(0, 6) so the
only quantize sits after the clamp; XNNPACK then folds the clamp into the conv. It must run before a
backend's own quantizer (in a ``ComposableQuantizer``): those annotators skip nodes already annotated.
ReLU6 is never replaced by ReLU. PTQ folds BN before annotation (conv -> hardtanh); QAT keeps
``batch_norm`` between them: both shapes match. Only exact (0, 6) bounds and single-user chains fuse.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import QuantizationConfig, Quantizer

from .annotate import (annotate, get_bias_qspec, get_input_act_qspec, get_output_act_qspec, get_weight_qspec,
                       is_annotated, mark_annotated)
from .ops import BN_OPS, CONV_OPS, HARDTANH_OPS


def is_relu6(node: Node) -> bool:
    """``hardtanh(x, 0, 6)`` exactly (other bounds are not ReLU6 and are left alone)."""
    if node.op != "call_function" or node.target not in HARDTANH_OPS:
        return False
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    return float(lo) == 0.0 and float(hi) == 6.0


def _single_user(node: Node) -> bool:
    return len(node.users) == 1


def _bn_producer(node: Node) -> Node | None:
    """For ``getitem(bn, 0)`` or ``bn`` return the BN node."""
    if node.op == "call_function" and node.target in BN_OPS:
        return node
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, Node) and src.op == "call_function" and src.target in BN_OPS:
            return src
    return None


def match_conv_relu6(act: Node) -> tuple[Node, list[Node]] | None:
    """If ``act`` is ReLU6 fed by a single-user conv (directly, or through a single-user BN as in QAT),
    return the conv and the intermediate nodes; else None."""
    if not is_relu6(act):
        return None
    src = act.args[0]
    between: list[Node] = []
    if not isinstance(src, Node) or not _single_user(src):
        return None
    bn = _bn_producer(src)
    if bn is not None:
        between = [src] if src is not bn else []
        between.append(bn)
        src = bn.args[0]
        if not isinstance(src, Node) or not _single_user(src):
            return None
    if src.op == "call_function" and src.target in CONV_OPS:
        return src, between
    return None


def annotate_conv_relu6(gm: GraphModule, config: QuantizationConfig,
                        filter_fn: Optional[Callable[[Node], bool]] = None) -> list[list[Node]]:
    """Annotate every conv -> [BN ->] ReLU6 chain as one quantized unit. Returns the partitions."""
    partitions: list[list[Node]] = []
    for act in gm.graph.nodes:
        found = match_conv_relu6(act)
        if found is None:
            continue
        conv, between = found
        weight = conv.args[1]
        bias = conv.args[2] if len(conv.args) > 2 else None
        partition = [act, *between, conv, weight]
        qmap = {conv.args[0]: get_input_act_qspec(config), weight: get_weight_qspec(config)}
        if isinstance(bias, Node):
            qmap[bias] = get_bias_qspec(config)
            partition.append(bias)
        if is_annotated(partition) or (filter_fn and not all(filter_fn(n) for n in partition)):
            continue
        annotate(conv, input_qspec_map=qmap)
        annotate(act, output_qspec=get_output_act_qspec(config))
        mark_annotated(partition)
        partitions.append(partition)
    return partitions


class Relu6Fusion(Quantizer):
    """A quantizer that annotates only the conv(-BN)-ReLU6 units (compose it before the backend's quantizer)."""

    def __init__(self, config: QuantizationConfig, filter_fn: Optional[Callable[[Node], bool]] = None):
        super().__init__()
        self.config, self.filter_fn = config, filter_fn

    def annotate(self, model: GraphModule) -> GraphModule:
        annotate_conv_relu6(model, self.config, self.filter_fn)
        return model

    def validate(self, model: GraphModule) -> None:
        return None
