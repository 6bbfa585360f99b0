"""PT2E stages every PT2E backend shares: prepare (annotate + observers), prepare for QAT, convert.

The quantizer comes from the backend (:mod:`mbquant.mobile`); the graph from
:class:`~mbquant.quant.export.FloatModel` (a copy: prepare mutates its input).
"""
from __future__ import annotations

from torch.fx import GraphModule
from torchao.quantization.pt2e.quantizer import Quantizer

from .. import compat
from ..errors import QuantizationError
from .ops import BN_OPS, count_targets
from .qat import QatGraph, fake_quants


def prepare(graph: GraphModule, quantizer: Quantizer) -> GraphModule:
    """Fold BN and insert observers where ``quantizer`` annotates (``graph`` is consumed)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    with compat.pattern_graphs_once():
        return prepare_pt2e(graph, quantizer)


def prepare_qat(train_graph: GraphModule, quantizer: Quantizer) -> QatGraph:
    """Insert fake-quantize modules into a train-mode export (conv-BN kept as a pattern that trains; BN is folded
    at convert)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    constants = compat.mode_constants(train_graph)    # the model's own BN momentum/eps, dropout p (torchao drops them)
    with compat.pattern_graphs_once():
        prepared = prepare_qat_pt2e(train_graph, quantizer)
    compat.restore_mode_constants(prepared, constants)
    allow_exported_model_train_eval(prepared)
    if not fake_quants(prepared):
        raise QuantizationError("prepare_qat inserted no fake-quantize modules; nothing would be trained for INT8")
    return QatGraph(prepared, convert, constants)


def convert(prepared: GraphModule) -> GraphModule:
    """Replace observers by quantize/dequantize pairs (eval mode); check that no batch_norm is left."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    with compat.pattern_graphs_once(), compat.fold_present_convs_only(prepared):
        int8 = convert_pt2e(prepared)
        move_exported_model_to_eval(int8)
    left = count_targets(int8, BN_OPS)
    if left:
        raise QuantizationError(f"{left} batch_norm ops are left after convert (BN was not folded into conv); "
                                f"put each BatchNorm directly after its conv")
    return int8
