"""A Cortex-M ``.pte`` read from its bytes and executed on the host: the program's own instructions, operators and
constants (deserialized from the flatbuffer), each ``cortex_m::`` kernel computed with ExecuTorch's reference
arithmetic (:mod:`.reference`: batched, identical to the shipped reference implementations).

This is what ``open`` of the pte-cortex-m backend returns, in a run and in ``mbquant check``: the bytes that ship
are the bytes that are measured. A file that is not a readable ExecuTorch program, or holds an operator the host
reference does not know, raises a VerificationError that says so. The program is planned for batch 1; the
interpreter runs a batch by giving every activation a leading batch dimension (``view_copy`` sizes of 1 become
-1). The memory plan itself is the device runtime's business and is checked by the memory report's tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ... import compat
from ...errors import VerificationError

# executorch.exir.schema.ScalarType -> torch dtype (the ones a Cortex-M program holds)
_DTYPES = {0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64, 6: torch.float32,
           7: torch.float64, 11: torch.bool}


@dataclass(frozen=True)
class _Tensor:
    """A tensor value that the program computes (no constant data): its planned shape and dtype."""

    sizes: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool
    memory: tuple[int, int] | None     # (memory id, offset) of its planned storage

    @property
    def numel_per_image(self) -> int:
        n = 1
        for s in self.sizes[1:]:
            n *= s
        return n


def _ops_registered() -> None:
    """The cortex_m:: ops are registered with torch when ExecuTorch's Cortex-M passes are imported."""
    import executorch.backends.cortex_m.passes.cortex_m_pass_manager  # noqa: F401


def _signature(schema) -> list[tuple[str, str]]:
    return [(a.name, str(a.type)) for a in schema.arguments if not a.is_out]


def _functional(packet, out_schema, name: str, source: str):
    """The functional overload an out-variant instruction computes: the one taking the same arguments without
    ``out`` (``aten::mul.out`` is ``mul.Tensor``, ``cortex_m::quantized_add.out`` its ``default``)."""
    want = _signature(out_schema)
    for overload in packet.overloads():
        op = getattr(packet, overload)
        if not any(a.is_out for a in op._schema.arguments) and _signature(op._schema) == want:
            return op
    raise VerificationError(f"'{source}' holds operator {name}, which has no functional form the host reference can "
                            f"run; it is not a program of the Cortex-M backend")


class CortexMProgram:
    """The program of a ``.pte`` (see the module doc); ``kernels`` maps ``"cortex_m::op"`` to a batched function
    taking the functional op's arguments (without ``out``); other ops run their registered functional variant."""

    def __init__(self, data: bytes, *, source: str, kernels: dict[str, Callable] | None = None):
        self.source = source
        if len(data) < 8 or data[4:6] != b"ET":
            raise VerificationError(f"'{source}' is not an ExecuTorch program (its first bytes lack the 'ET' file "
                                    f"identifier); write the artifact again")
        try:
            program = compat.deserialize_program(data)
        except Exception as exc:   # a truncated or damaged flatbuffer fails in many ways inside the deserializer
            raise VerificationError(f"'{source}' is not a readable ExecuTorch program ({type(exc).__name__}: "
                                    f"{str(exc)[:200]}); the file is truncated or damaged: write it again") from exc
        if not program.execution_plan:
            raise VerificationError(f"'{source}' holds no method; write the artifact again")
        plan = program.execution_plan[0]
        _ops_registered()
        self.operators = [f"{o.name}.{o.overload}" if o.overload else o.name for o in plan.operators]
        self._ops = [self._resolve(o.name, o.overload) for o in plan.operators]
        self.kernels = kernels or {}
        self._values = [self._value(v.val, program, plan, i) for i, v in enumerate(plan.values)]
        if len(plan.inputs) != 1 or len(plan.outputs) != 1:
            raise VerificationError(f"'{source}' has {len(plan.inputs)} inputs and {len(plan.outputs)} outputs; an "
                                    f"image classifier has one of each")
        self.input, self.output = plan.inputs[0], plan.outputs[0]
        self.input_spec = self._values[self.input]
        if not isinstance(self.input_spec, _Tensor):
            raise VerificationError(f"'{source}': the program's input is not a tensor")
        self._steps = []
        for chain in plan.chains:
            for ins in chain.instructions:
                args = ins.instr_args
                kind = type(args).__name__
                if kind == "KernelCall":
                    if not 0 <= args.op_index < len(self._ops):
                        raise VerificationError(f"'{source}': an instruction names operator {args.op_index} of "
                                                f"{len(self._ops)}; the file is damaged")
                    self._steps.append((args.op_index, list(args.args)))
                elif kind == "MoveCall":
                    self._steps.append((-1, [args.move_from, args.move_to]))
                elif kind != "FreeCall":
                    raise VerificationError(f"'{source}': instruction {kind} is not run by the host reference of a "
                                            f"Cortex-M program (a delegate or control flow?)")
        for _, args in self._steps:
            if any(not 0 <= a < len(self._values) for a in args):
                raise VerificationError(f"'{source}': an instruction refers to a value that does not exist; the "
                                        f"file is damaged")

    def _resolve(self, name: str, overload: str):
        ns, _, op = name.partition("::")
        try:
            packet = getattr(getattr(torch.ops, ns), op)
            out_schema = getattr(packet, overload or "default")._schema
        except (AttributeError, RuntimeError) as exc:
            raise VerificationError(f"'{self.source}' holds operator {name}.{overload}, which the host reference does "
                                    f"not know; it is not a program of the Cortex-M backend") from exc
        n_out = sum(1 for a in out_schema.arguments if a.is_out)
        return name, _functional(packet, out_schema, f"{name}.{overload}", self.source), \
            len(out_schema.arguments) - n_out, n_out

    def _value(self, val: Any, program: Any, plan: Any, index: int) -> Any:
        kind = type(val).__name__
        if kind in ("Int", "Double", "Bool"):
            return val.int_val if kind == "Int" else (val.double_val if kind == "Double" else val.bool_val)
        if kind == "Null":
            return None
        if kind == "String":
            return val.string_val
        if kind == "IntList":
            return ("intlist", list(val.items))
        if kind in ("DoubleList", "BoolList"):
            return list(val.items)
        if kind == "Tensor":
            dtype = _DTYPES.get(int(val.scalar_type))
            if dtype is None:
                raise VerificationError(f"'{self.source}': value {index} has element type {val.scalar_type}, which no "
                                        f"Cortex-M kernel takes")
            sizes, order = [int(s) for s in val.sizes], [int(d) for d in val.dim_order]
            if sorted(order) != list(range(len(sizes))):
                raise VerificationError(f"'{self.source}': value {index} has dim order {order} for sizes {sizes}")
            if val.data_buffer_idx > 0:
                if val.data_buffer_idx >= len(program.constant_buffer):
                    raise VerificationError(f"'{self.source}': value {index} names constant "
                                            f"{val.data_buffer_idx} of {len(program.constant_buffer)}; the file is "
                                            f"truncated or damaged")
                raw = bytes(program.constant_buffer[val.data_buffer_idx].storage)
                numel = 1
                for s in sizes:
                    numel *= s
                if len(raw) < numel * torch.tensor([], dtype=dtype).element_size():
                    raise VerificationError(f"'{self.source}': constant of value {index} has {len(raw)} bytes for "
                                            f"{sizes} {dtype}; the file is truncated or damaged")
                flat = torch.frombuffer(bytearray(raw[:numel * torch.tensor([], dtype=dtype).element_size()]),
                                        dtype=dtype)
                physical = flat.reshape([sizes[d] for d in order])
                inverse = [order.index(i) for i in range(len(order))]
                return physical.permute(inverse)
            alloc = val.allocation_info
            memory = None if alloc is None else (int(alloc.memory_id),
                                                 int(alloc.memory_offset_low) + (int(alloc.memory_offset_high) << 32))
            return _Tensor(tuple(sizes), dtype, order == [0, 2, 3, 1], memory)
        if kind in ("TensorList", "OptionalTensorList"):
            return ("tensorlist", list(val.items))
        raise VerificationError(f"'{self.source}': value {index} is a {kind}, which the host reference does not run")

    def _arg(self, env: dict[int, Any], written: dict[tuple[int, int], torch.Tensor], i: int) -> Any:
        if i in env:
            return env[i]
        v = self._values[i]
        if isinstance(v, tuple) and v and v[0] == "intlist":
            return [self._arg(env, written, j) for j in v[1]]
        if isinstance(v, tuple) and v and v[0] == "tensorlist":
            return [self._arg(env, written, j) if j >= 0 else None for j in v[1]]
        if isinstance(v, _Tensor):
            src = written.get(v.memory) if v.memory is not None else None
            if src is not None and src.dtype == v.dtype and src[0].numel() == v.numel_per_image:
                # a view the emitter turned into shared storage (a removed view_copy): the same bytes, reshaped
                view = src.reshape(src.shape[0], *v.sizes[1:])
                return view.contiguous(memory_format=torch.channels_last) if v.channels_last else view.contiguous()
            return torch.empty(0, dtype=v.dtype)   # planned memory no kernel wrote (a scratch buffer)
        return v

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The program on a batch ``x`` (N x C x H x W, the input's dtype), computed instruction by instruction."""
        spec = self.input_spec
        if x.dtype != spec.dtype or list(x.shape[1:]) != list(spec.sizes[1:]):
            raise VerificationError(f"'{self.source}' takes {spec.dtype} inputs of shape [N, {', '.join(map(str, spec.sizes[1:]))}]"
                                    f", got {x.dtype} {list(x.shape)}")
        if spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        env: dict[int, Any] = {}
        written: dict[tuple[int, int], torch.Tensor] = {}
        self._store(env, written, self.input, x)
        with torch.no_grad():
            for op_index, args in self._steps:
                if op_index < 0:
                    self._store(env, written, args[1], self._arg(env, written, args[0]))
                    continue
                name, functional, n_in, n_out = self._ops[op_index]
                inputs = [self._arg(env, written, a) for a in args[:n_in]]
                if name == "aten::view_copy" and inputs[1] and inputs[1][0] == 1 and inputs[0].shape[0] != 1:
                    inputs[1] = [-1, *inputs[1][1:]]
                fn = self.kernels.get(name, functional)
                self._store(env, written, args[n_in], fn(*inputs))
        out = self._arg(env, written, self.output)
        if not isinstance(out, torch.Tensor) or out.numel() == 0:
            raise VerificationError(f"'{self.source}': no instruction computes the program's output")
        return out

    def _store(self, env: dict[int, Any], written: dict, index: int, value: Any) -> None:
        env[index] = value
        spec = self._values[index]
        if isinstance(spec, _Tensor) and spec.memory is not None and isinstance(value, torch.Tensor):
            written[spec.memory] = value
