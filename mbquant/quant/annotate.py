"""Backend-neutral annotation helpers for the quantizers mbquant composes (conv-ReLU6 fusion, layers kept in float):
the qspecs of a torchao ``QuantizationConfig`` and the "already annotated" mark every annotator of a composed
quantizer respects. No backend's quantizer utilities are imported here."""
from __future__ import annotations

from torch.fx import Node
from torchao.quantization.pt2e.quantizer.utils import (get_bias_qspec, get_input_act_qspec, get_output_act_qspec,
                                                       get_weight_qspec)

from .. import compat

__all__ = ["annotate", "get_bias_qspec", "get_input_act_qspec", "get_output_act_qspec", "get_weight_qspec",
           "is_annotated", "mark_annotated"]


def is_annotated(nodes: list[Node]) -> bool:
    """Whether any node of a pattern already carries an annotation (another annotator claimed it)."""
    return any(compat.is_annotated(n) for n in nodes)


def mark_annotated(nodes: list[Node]) -> None:
    for n in nodes:
        if n is not None:
            compat.mark_annotated(n)


def annotate(node: Node, *, input_qspec_map: dict | None = None, output_qspec=None) -> None:
    """Give ``node`` its (final) annotation: later annotators skip it."""
    node.meta[compat.annotation_key()] = compat.new_annotation(input_qspec_map=input_qspec_map or {},
                                                               output_qspec=output_qspec)
