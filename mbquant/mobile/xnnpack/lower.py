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
    int8_regions: int = 0
    float_islands: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        total = self.delegated_ops + self.outside_ops
        return self.delegated_ops / total if total else 0.0

    def to_dict(self) -> dict:
        return {"delegated_ops": self.delegated_ops, "outside_ops": self.outside_ops,
                "delegate_calls": self.delegate_calls, "ratio": round(self.ratio, 4),
                "ops_outside_delegate": self.ops_outside_delegate, "int8_regions": self.int8_regions,
                "float_islands": self.float_islands}


def delegation_of(gm: GraphModule) -> Delegation:
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(gm)
    ops = {k: v for k, v in info.delegation_by_operator.items() if k != GETITEM}
    outside = {k: v.non_delegated for k, v in ops.items() if v.non_delegated}
    int8, islands = _precision_inside(gm)
    return Delegation(sum(v.delegated for v in ops.values()), sum(outside.values()), info.num_delegated_subgraphs,
                      outside, int8, islands)


_QDQ = ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel")


def _op_name(node) -> str:
    """``add.Tensor``, ``hardswish.default``: the name XNNPACK's partitioner configs use."""
    op = getattr(node.target, "_op", node.target)
    schema = getattr(op, "_schema", None)
    if schema is None:
        return str(getattr(node.target, "__name__", node.target))
    return f"{schema.name.split('::')[-1]}.{schema.overload_name or 'default'}"


def _is_qdq(node) -> bool:
    return node.op == "call_function" and _op_name(node).split(".")[0] in _QDQ


def _precision_inside(gm: GraphModule) -> tuple[int, dict[str, dict[str, int]]]:
    """Which computations inside the XNNPACK delegate run in INT8 and which are float islands.

    Inside each delegated subgraph, compute ops connected without a quantize/dequantize between them form one
    region (XNNPACK fuses, e.g., a conv and its ReLU). A region runs on INT8 kernels when every op in it has a
    static-quantized XNNPACK kernel (the partitioner's own configs say which), all its inputs are dequantized
    INT8 tensors and all its outputs are quantized again; any other region is a float island: XNNPACK converts
    its INT8 input to fp32, computes in fp32 (hardswish; hardsigmoid, decomposed into add/clamp/div; a layer
    kept in float) and converts back. Islands are grouped by their ops, with how many there are and how many
    fp32 values per image they compute (what the conversions and the fp32 arithmetic scale with)."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType

    static = {c.target_name for c in (config() for config in ALL_PARTITIONER_CONFIGS)
              if ConfigPrecisionType.STATIC_QUANT in c.supported_precision_types()}
    int8, islands = 0, {}
    for node in gm.graph.nodes:
        if not (node.op == "call_function" and "call_delegate" in str(node.target)):
            continue
        sub = getattr(getattr(gm, node.args[0].target), "original_module", None)
        if sub is None:
            continue
        compute = [n for n in sub.graph_module.graph.nodes if n.op == "call_function" and not _is_qdq(n)
                   and GETITEM not in str(n.target)]
        parent = {n: n for n in compute}         # union-find over the edges between compute ops

        def find(n):
            while parent[n] is not n:
                n = parent[n]
            return n

        for n in compute:
            for a in n.all_input_nodes:
                if a in parent:
                    parent[find(n)] = find(a)
        groups: dict = {}
        for n in compute:
            groups.setdefault(find(n), []).append(n)
        for members in groups.values():
            inside = set(members)
            ins = [a for n in members for a in n.all_input_nodes if a not in inside and a.op == "call_function"]
            outs = [u for n in members for u in n.users if u not in inside]
            if (all(_op_name(n) in static for n in members) and ins and all(_is_qdq(a) for a in ins)
                    and outs and all(_is_qdq(u) and not _op_name(u).startswith("de") for u in outs)):
                int8 += 1
                continue
            key = "+".join(_op_name(n).split(".")[0] for n in members)
            entry = islands.setdefault(key, {"islands": 0, "fp32_values_per_image": 0})
            entry["islands"] += 1
            entry["fp32_values_per_image"] += sum(_values_per_image(n) for n in members)
    return int8, islands


def _values_per_image(node) -> int:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return 0
    return int(val.numel() // max(int(val.shape[0]), 1))


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
