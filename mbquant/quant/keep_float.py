"""Layers kept in fp32 (NNCF's "ignored scope"): ``--keep-float NAME[,NAME]``.

A kept layer runs in fp32 (fp32 weights, fp32 arithmetic) on the dequantized INT8 tensors it reads; the layers
around it stay INT8: its activation inputs are still quantized (so the op that produces them keeps an INT8
output) and an output it hands to an INT8 op is quantized (as every INT8 op's input is); an output that is the
model's output (the logits) stays fp32. Names are
module names of the float model (``classifier.1``) or ``logits``, the layer whose output is the model's
output. Unknown names are an error that lists the names there are.
"""
from __future__ import annotations

import difflib
from typing import Iterable

from torch import nn
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import QuantizationConfig, Quantizer

from ..config import LOGITS
from ..errors import ConfigError
from .annotate import annotate, get_input_act_qspec, get_output_act_qspec
from .ops import COMPUTE_OPS, CONV_OPS, LINEAR_OPS, module_path, module_paths


def output_layers(graph: GraphModule) -> list[str]:
    """Module names of the layers whose outputs are the graph's outputs (the classifier)."""
    names = []
    for n in graph.graph.nodes:
        if n.op == "output":
            for src in n.all_input_nodes:
                path = module_path(src)
                if path and path not in names:
                    names.append(path)
    return names


def resolve_names(names: Iterable[str], model: nn.Module, graph: GraphModule) -> tuple[str, ...]:
    """Module names for ``names`` (``logits`` expanded); an unknown name is a ConfigError with the fix."""
    known = {n for n, _ in model.named_modules() if n}
    out: list[str] = []
    for name in names:
        found = output_layers(graph) if name == LOGITS else [name]
        if name == LOGITS and not found:
            raise ConfigError("--keep-float logits: the model's output comes from no module; name the layer instead")
        for f in found:
            if f not in known:
                close = difflib.get_close_matches(f, sorted(known), n=3)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise ConfigError(f"--keep-float '{f}' is not a layer of {type(model).__name__}; {hint}pass module "
                                  f"names as in model.named_modules() (e.g. {_examples(model)}) or '{LOGITS}'")
            if f not in out:
                out.append(f)
    return tuple(out)


def _examples(model: nn.Module) -> str:
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    return ", ".join(leaves[:2] + leaves[-1:])


def within(name: str, layers: Iterable[str]) -> bool:
    """Whether the module ``name`` is one of ``layers`` or a submodule of one."""
    return any(name == layer or name.startswith(layer + ".") for layer in layers)


def in_layers(node: Node, layers: tuple[str, ...]) -> bool:
    """Whether ``node`` was traced from one of ``layers`` (or a submodule of one)."""
    return any(within(p, layers) for p in module_paths(node))


class KeepFloat(Quantizer):
    """Annotate the ops of the kept layers first, so that no later quantizer quantizes them: their weights and
    arithmetic stay fp32; their activation inputs from outside the layer stay quantized, and so do outputs that
    feed an op outside the kept layers.
    ``quantizable(node)`` is the filter the other quantizers of the composition take."""

    def __init__(self, layers: tuple[str, ...], config: QuantizationConfig):
        super().__init__()
        self.layers, self.config = tuple(layers), config
        self.annotated: list[str] = []

    def quantizable(self, node: Node) -> bool:
        return not (self.layers and in_layers(node, self.layers))

    def annotate(self, model: GraphModule) -> GraphModule:
        if not self.layers:
            return model
        for n in model.graph.nodes:
            if n.op != "call_function" or not in_layers(n, self.layers):
                continue
            compute = n.target in COMPUTE_OPS
            qmap = {a: get_input_act_qspec(self.config) for a in _activation_inputs(n)
                    if not in_layers(a, self.layers)} if compute else {}
            feeds_int8 = compute and any(u.op != "output" and not in_layers(u, self.layers) for u in n.users)
            annotate(n, input_qspec_map=qmap, output_qspec=get_output_act_qspec(self.config) if feeds_int8 else None)
            self.annotated.append(n.name)
        if not self.annotated:
            raise ConfigError(f"--keep-float {','.join(self.layers)}: those layers contain no operation of the "
                              f"exported graph; name layers that compute something (conv, linear, ...)")
        return model

    def validate(self, model: GraphModule) -> None:
        return None


def _activation_inputs(node: Node) -> list[Node]:
    """The tensors an op computes on (not the weight and bias of a conv/linear)."""
    args = node.args[:1] if node.target in CONV_OPS | LINEAR_OPS else node.args
    flat = [x for a in args for x in (a if isinstance(a, (list, tuple)) else [a])]
    return [a for a in flat if isinstance(a, Node) and a.op != "get_attr"]
