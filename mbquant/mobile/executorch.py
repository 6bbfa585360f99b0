"""Lower a (float or INT8) PT2E graph to an ExecuTorch program with the XNNPACK delegate, and write it."""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import GraphModule

from .._io import write_bytes
from ..errors import ExportError
from ..quant.ptq import example_input


@dataclass
class Delegation:
    """How much of the program runs inside the delegate. ``getitem`` (tuple unpacking) is not counted."""

    delegated: int
    outside: int
    subgraphs: int
    outside_ops: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        total = self.delegated + self.outside
        return self.delegated / total if total else 0.0

    def to_dict(self) -> dict:
        return {"delegated_ops": self.delegated, "outside_ops": self.outside, "delegate_calls": self.subgraphs,
                "ratio": round(self.ratio, 4), "ops_outside_delegate": self.outside_ops}


@dataclass
class Lowered:
    buffer: bytes
    delegation: Delegation
    program_ops: dict[str, int]


def delegation_of(gm: GraphModule) -> Delegation:
    delegated = subgraphs = 0
    outside: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module_"):
            subgraphs += 1
            lowered = getattr(gm, node.name)
            delegated += sum(1 for n in lowered.original_module.graph.nodes
                             if n.op == "call_function" and n.target is not operator.getitem)
        elif node.op == "call_function" and node.target is not operator.getitem \
                and "executorch_call_delegate" not in str(node.target):
            outside[str(node.target)] += 1
    return Delegation(delegated, sum(outside.values()), subgraphs, dict(outside))


class _ConstantPropagation:
    """Fold constant-only ops (e.g. the dtype copies of the scalars hardsigmoid decomposes into) before
    partitioning, so no op on constants is left outside the delegate. Quantize/dequantize are kept."""

    def __new__(cls):
        from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult
        from executorch.exir.passes.constant_prop_pass import constant_prop_pass

        class Pass(ExportedProgramPassBase):
            def call(self, exported_program):
                return ExportedProgramPassResult(constant_prop_pass(exported_program), True)

        return Pass()


def lower(gm: GraphModule, resolution: int, *, batch: int = 1) -> Lowered:
    """``torch.export`` the graph at a fixed ``batch`` and lower it with ``XnnpackPartitioner``.

    A static batch keeps the whole network in one XNNPACK delegate call (with a dynamic batch the
    flatten's symbolic ``view`` stays outside the delegate).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        ep = torch.export.export(gm, (example_input(resolution, batch),))
        edge = to_edge_transform_and_lower(ep, transform_passes=[_ConstantPropagation()],
                                           partitioner=[XnnpackPartitioner()])
        delegation = delegation_of(edge.exported_program().graph_module)
        program = edge.to_executorch()
    except Exception as exc:
        raise ExportError(f"lowering to ExecuTorch/XNNPACK failed: {type(exc).__name__}: {str(exc)[:400]}") from exc
    ops = Counter(str(n.target) for n in program.exported_program().graph_module.graph.nodes if n.op == "call_function")
    return Lowered(program.buffer, delegation, dict(ops))


def write_pte(lowered: Lowered, path: Path | str) -> Path:
    """Write the program atomically (temporary name, then rename): never a half-written ``.pte``."""
    path = Path(path)
    if path.suffix != ".pte":
        raise ExportError(f"ExecuTorch programs are written as .pte files, got '{path}'; use a name ending in .pte")
    return write_bytes(path, lowered.buffer)
