"""Lower a PT2E INT8 graph (CortexMQuantizer) to an ExecuTorch program of ``cortex_m::`` CMSIS-NN INT8 kernels.

export at batch 1 (channels_last) -> ``to_edge_transform_and_lower`` with the Cortex-M edge compile config
-> [``QuantizeInputs``: the program takes the quantized image] -> ``CortexMPassManager`` for the CPU (the
CMSIS-NN scratch buffer of each kernel is sized for that core) -> dead constants pruned -> ``to_executorch``
with the best of ExecuTorch's greedy and mbquant's best-fit memory plans. The host reference runs the
written program's own bytes (:mod:`.program`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

from ... import compat
from ...errors import ExportError
from .memory import best_fit, program_memory

INT8_KERNELS = "cortex_m::"
ALLOWED_NON_KERNELS = ("executorch_prim::", "aten::view_copy")   # memory views, no arithmetic


@dataclass
class Lowered:
    buffer: bytes
    memory: dict[str, Any]
    operators: list[str]
    input_qparams: dict[str, Any] = field(default_factory=dict)

    @property
    def non_int8_ops(self) -> list[str]:
        return [op for op in self.operators if not op.startswith(INT8_KERNELS) and not op.startswith(ALLOWED_NON_KERNELS)]


def prune_unused_constants(ep) -> list[str]:
    """Remove constants no op reads any more (the pass manager leaves the original OIHW weights and per-channel
    scale/zero-point tensors behind; they would be written into the program and cost flash)."""
    g = ep.graph_module.graph
    users = set(ep.graph_signature.user_inputs)
    dead = [n for n in g.nodes if n.op == "placeholder" and not n.users and n.name not in users]
    names = {n.name for n in dead}
    for spec in [s for s in ep.graph_signature.input_specs if s.arg.name in names]:
        ep.graph_signature.input_specs.remove(spec)
        compat.drop_constant(ep, spec.target)
    for n in dead:
        g.erase_node(n)
    ep.graph_module.recompile()
    return sorted(names)


def _input_qparams(ep) -> dict[str, Any]:
    """Scale and zero point of the program's input quantize (what the caller applies with --int8-input)."""
    quantize = compat.edge_ops().edge.cortex_m.quantize_per_tensor.default
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target == quantize:
            return {"scale": float(n.args[1]), "zero_point": int(n.args[2]), "dtype": "int8"}
    return {}


def lower(int8: GraphModule, resolution: int, *, cpu: str, int8_input: bool) -> Lowered:
    from executorch.backends.cortex_m.edge_compile_config import cortex_m_edge_compile_config
    from executorch.backends.cortex_m.passes.cortex_m_pass_manager import CortexMPassManager
    from executorch.backends.cortex_m.target_config import CortexMTargetConfig
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.memory_planning import MemoryPlanningAlgorithmSuite, greedy
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.quantize_io_pass import QuantizeInputs

    x1 = torch.zeros(1, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
    try:
        edge = to_edge_transform_and_lower(torch.export.export(int8, (x1,)),
                                           compile_config=cortex_m_edge_compile_config())
        io: dict[str, Any] = {}
        if int8_input:
            io = _input_qparams_of_edge(edge)
            edge = edge.transform([QuantizeInputs(edge, [0])])
            compat.drop_config_methods(edge)   # the qparams travel in the sidecar and the firmware header
        ep = CortexMPassManager(edge.exported_program(),
                                target_config=CortexMTargetConfig.from_target_string(cpu)).transform()
        prune_unused_constants(ep)
        io = io or _input_qparams(ep)
        compat.set_edge_program(edge, ep)
        planner = MemoryPlanningPass(memory_planning_algo=MemoryPlanningAlgorithmSuite([greedy, best_fit]))
        et = edge.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=False,
                                                        memory_planning_pass=planner))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"lowering to the ExecuTorch Cortex-M backend failed: {type(exc).__name__}: "
                          f"{str(exc)[:400]}") from exc
    plan = et.executorch_program.execution_plan[0]
    ops = [f"{o.name}.{o.overload}" if o.overload else o.name for o in plan.operators]
    return Lowered(et.buffer, program_memory(et), ops, io)


def _input_qparams_of_edge(edge) -> dict[str, Any]:
    """The input quantize of the edge program before the pass manager (quantized_decomposed)."""
    for n in edge.exported_program().graph.nodes:
        if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target):
            return {"scale": float(n.args[1]), "zero_point": int(n.args[2]), "dtype": "int8"}
    raise ExportError("the Cortex-M program has no input quantize; --int8-input needs a quantized input")
