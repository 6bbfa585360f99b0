"""Flash and RAM of a Cortex-M program, read from the program itself (its constants and its memory plan).

Flash: the ``.pte`` bytes, split into constant tensors by dtype and the rest (program structure, op
arguments). RAM: the planned arena (every activation, the CMSIS-NN scratch buffer of each kernel, and the
input and output, which the program plans too), the tensors live at the peak and the op that sets it.

:func:`best_fit` is an offset planner for ExecuTorch's memory planning (offered next to ExecuTorch's own
greedy one; the smaller plan wins): largest tensor first, each at the lowest offset that no tensor with an
overlapping lifetime occupies. ExecuTorch's greedy planner stacks "shared objects" and can leave gaps (MobileNetV1
0.25 at 96x96: 73,728 B planned for a 55,296 B peak; best fit: the peak).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from executorch.exir.memory_planning import MemoryAlgoResult, SpecAllocResult, get_node_tensor_specs


def best_fit(alignment: int, specs, graph_module, graph_signature, extra_padding: int = 0) -> MemoryAlgoResult:
    result = MemoryAlgoResult({}, [])
    placed: dict[int, list[tuple[int, int, Any]]] = defaultdict(list)   # mem_id -> (offset, size, spec)
    bases = [s for s in specs if s.storage_base is None]
    views = [s for s in specs if s.storage_base is not None]
    prefix = getattr(graph_module, "input_mem_buffer_sizes", None) or []
    for obj_id, spec in enumerate(sorted(bases, key=lambda s: (-s.allocated_memory, s.lifetime[0]))):
        spec.realign(alignment)
        mem_id = spec.mem_id if spec.mem_id is not None else 1
        start = prefix[mem_id] if len(prefix) > mem_id else 0
        lo, hi = spec.lifetime
        busy = sorted((o, sz) for o, sz, s in placed[mem_id] if not (hi < s.lifetime[0] or lo > s.lifetime[1]))
        offset = start
        for o, sz in busy:
            if offset + spec.allocated_memory <= o:
                break
            offset = max(offset, o + sz)
        placed[mem_id].append((offset, spec.allocated_memory, spec))
        result.spec_dict[spec] = SpecAllocResult(mem_id, obj_id, offset)
    for spec in views:   # storage-backed views live inside their base
        spec.realign(alignment)
        base = result.spec_dict[spec.storage_base]
        result.spec_dict[spec] = SpecAllocResult(base.mem_id, base.mem_obj_id, base.mem_offset + spec.storage_base_offset)
    sizes = [0] * (max(placed, default=1) + 1)
    for mem_id, items in placed.items():
        sizes[mem_id] = max((o + sz for o, sz, _ in items), default=0) + extra_padding
    result.bufsizes = sizes if len(sizes) > 1 else [0, 0]
    return result


def _op_name(node) -> str:
    t = str(node.target)
    return t.split("::")[-1].split(".")[0] if "::" in t else getattr(node.target, "__name__", t)


def _consumers(gm) -> dict[str, Any]:
    """alloc node name -> the op that writes into it (out= or a trailing scratch argument)."""
    owner = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        for a in [*n.args, *n.kwargs.values()]:
            for x in (a if isinstance(a, (list, tuple)) else [a]):
                if hasattr(x, "op") and x.op == "call_function" and "alloc" in str(x.target):
                    owner.setdefault(x.name, n)
    return owner


def program_memory(et) -> dict[str, Any]:
    """The memory report of an ``ExecutorchProgramManager`` (see the module doc)."""
    from executorch.exir import schema

    prog = et.executorch_program
    plan = prog.execution_plan[0]
    by_dtype: dict[str, int] = defaultdict(int)
    largest: list[tuple[int, str, list[int]]] = []
    seen: set[int] = set()
    for v in plan.values:
        t = v.val
        if isinstance(t, schema.Tensor) and t.data_buffer_idx > 0 and t.data_buffer_idx not in seen:
            seen.add(t.data_buffer_idx)
            n = len(prog.constant_buffer[t.data_buffer_idx].storage)
            by_dtype[t.scalar_type.name.lower()] += n
            largest.append((n, t.scalar_type.name.lower(), list(t.sizes)))
    program = len(et.buffer)
    gm = et.exported_program().graph_module
    owner = _consumers(gm)
    specs = {}
    for n in gm.graph.nodes:
        for s in get_node_tensor_specs(n):
            if s.mem_id is not None and not s.const and id(s) not in specs:
                specs[id(s)] = (n, s)
    scratch = []
    for n, s in specs.values():
        user = owner.get(n.name)
        if user is not None and n.name != _out_of(user):
            scratch.append({"op": _op_name(user), "node": user.name, "bytes": int(s.nbytes())})
    arena = int(plan.non_const_buffer_sizes[1]) if len(plan.non_const_buffer_sizes) > 1 else 0
    peak = _peak(specs, owner)
    inp, out = plan.values[plan.inputs[0]].val, plan.values[plan.outputs[0]].val
    return {
        "flash": {"program_bytes": program, "constants_by_dtype": dict(by_dtype),
                  "other_bytes": program - sum(by_dtype.values()),
                  "largest_constants": [{"bytes": b, "dtype": d, "shape": sh} for b, d, sh in sorted(largest)[::-1][:5]]},
        "ram": {"arena_bytes": arena, "scratch_bytes_total": sum(x["bytes"] for x in scratch),
                "scratch_max": max(scratch, key=lambda x: x["bytes"], default=None),
                "scratch": [x for x in scratch if x["bytes"]],
                "input": _io(inp), "output": _io(out), "peak_live_bytes": peak["bytes"],
                "peak_set_by": peak["op"], "peak_tensors": peak["tensors"]},
    }


def _out_of(user) -> str | None:
    out = user.kwargs.get("out")
    return out.name if hasattr(out, "name") else None


def _io(t) -> dict[str, Any]:
    size = 1
    for d in t.sizes:
        size *= int(d)
    nbytes = size * {"CHAR": 1, "BYTE": 1, "FLOAT": 4, "INT": 4, "SHORT": 2}.get(t.scalar_type.name, 4)
    return {"dtype": t.scalar_type.name.lower(), "shape": list(t.sizes), "bytes": nbytes}


def _peak(specs: dict, owner: dict) -> dict[str, Any]:
    if not specs:
        return {"bytes": 0, "op": None, "tensors": []}
    end = max(s.lifetime[1] for _, s in specs.values())

    def live(t):
        return [(n, s) for n, s in specs.values() if s.lifetime[0] <= t <= s.lifetime[1]]

    t = max(range(end + 1), key=lambda i: sum(s.allocated_memory for _, s in live(i)))
    tensors = sorted(live(t), key=lambda p: -p[1].allocated_memory)
    rows = [{"tensor": n.name, "written_by": _op_name(owner[n.name]) if n.name in owner else "input",
             "shape": list(s.shape), "dtype": str(s.dtype).replace("torch.", ""), "bytes": int(s.allocated_memory)}
            for n, s in tensors if s.allocated_memory]
    top = next((owner[n.name] for n, _ in tensors if n.name in owner), None)
    return {"bytes": sum(r["bytes"] for r in rows), "op": top.name if top is not None else "input", "tensors": rows}
