"""Lower a (float or INT8) PT2E graph to an ExecuTorch program with the XNNPACK delegate, and write it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import GraphModule

from ...atomic import write_bytes
from ...errors import ExportError
from ...quant.export import example_input

GETITEM = "getitem"  # tuple unpacking of the delegate's outputs: not an op, not counted


@dataclass(frozen=True)
class Delegation:
    """How much of the program runs inside the delegate, from ExecuTorch's ``get_delegation_info``
    (``getitem``, tuple unpacking, is not counted on either side)."""

    delegated_ops: int
    outside_ops: int
    delegate_calls: int
    ops_outside_delegate: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        total = self.delegated_ops + self.outside_ops
        return self.delegated_ops / total if total else 0.0

    def to_dict(self) -> dict:
        return {"delegated_ops": self.delegated_ops, "outside_ops": self.outside_ops,
                "delegate_calls": self.delegate_calls, "ratio": round(self.ratio, 4),
                "ops_outside_delegate": self.ops_outside_delegate}


def delegation_of(gm: GraphModule) -> Delegation:
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(gm)
    ops = {k: v for k, v in info.delegation_by_operator.items() if k != GETITEM}
    outside = {k: v.non_delegated for k, v in ops.items() if v.non_delegated}
    return Delegation(sum(v.delegated for v in ops.values()), sum(outside.values()), info.num_delegated_subgraphs,
                      outside)


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


@dataclass(frozen=True)
class Lowered:
    buffer: bytes
    delegation: Delegation


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
    return Lowered(program.buffer, delegation)


def write_pte(lowered: Lowered, path: Path | str) -> Path:
    """Write the program atomically (temporary name, then rename): never a half-written ``.pte``."""
    path = Path(path)
    if path.suffix != ".pte":
        raise ExportError(f"ExecuTorch programs are written as .pte files, got '{path}'; use a name ending in .pte")
    return write_bytes(path, lowered.buffer)
