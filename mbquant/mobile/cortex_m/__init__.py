"""``pte-cortex-m``: PT2E INT8 with ExecuTorch's CortexMQuantizer -> an ExecuTorch program of CMSIS-NN INT8
kernels (``cortex_m::`` ops) for Cortex-M microcontrollers (``--target mcu --cpu cortex-m4|m7|m33|m55``).

lower.py (lowering, int8 input, dead constants), memory.py (flash/RAM report, best-fit planner),
reference.py (the program run on the host with the reference kernels, batched), firmware.py (C header).
The ``.pte`` cannot run on this host (its kernels are CMSIS-NN's); it is read back and checked against the
lowered program, and its accuracy is measured on the same program with the reference kernels.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from ..._io import write_bytes
from ...config import QuantConfig
from ...errors import ConfigError, VerificationError
from ...quant import pt2e
from ...quant.export import FloatModel
from ..backend import Backend, Predictor, Written
from .firmware import write_header
from .lower import Lowered, lower, prune_unused_constants
from .reference import HostProgram, conv, requantize

__all__ = ["CortexMBackend", "HostProgram", "Lowered", "backend", "conv", "lower", "prune_unused_constants",
           "requantize"]


class CortexMBackend(Backend):
    def __init__(self, spec, run):
        super().__init__(spec, run)
        self._lowered: dict[Path, tuple[str, Lowered]] = {}

    def prepare(self, fm: FloatModel, config: QuantConfig) -> GraphModule:
        from executorch.backends.cortex_m.quantizer.quantizer import CortexMQuantizer

        return pt2e.prepare(fm.graph_copy(channels_last=True), CortexMQuantizer())

    def prepare_qat(self, fm: FloatModel, config: QuantConfig):
        raise ConfigError("QAT is not offered for --target mcu (see mbquant.mobile.table: qat=False)")

    def convert(self, prepared: nn.Module) -> GraphModule:
        return pt2e.convert(prepared)

    def write(self, model: nn.Module, stem: Path, *, resolution: int) -> list[Written]:
        t = time.perf_counter()
        lowered = lower(model, resolution, cpu=self.run.cpu, int8_input=self.run.int8_input)
        seconds = round(time.perf_counter() - t, 1)
        path = write_bytes(Path(f"{stem}.pte"), lowered.buffer)
        self._lowered[path] = (hashlib.sha256(lowered.buffer).hexdigest(), lowered)
        details = {"lower_seconds": seconds, "cpu": self.run.cpu, "int8_input": self.run.int8_input,
                   "input_qparams": lowered.input_qparams, "operators": lowered.operators,
                   "non_int8_ops": lowered.non_int8_ops, "memory": lowered.memory,
                   "notes": ["accuracy is the host reference of the cortex_m:: kernels' arithmetic, not a device run"]}
        return [Written(path, details)]

    def load(self, path: Path) -> Predictor:
        """The written program read back and checked (same bytes, a valid program with the lowered ops), then run
        with the host reference kernels."""
        from executorch.exir._serialize._program import deserialize_pte_binary

        path = Path(path)
        if path not in self._lowered:
            raise VerificationError(f"'{path}' was not written by this backend in this run; the host reference runs "
                                    f"the lowered program it keeps, so load what write() returned")
        digest, lowered = self._lowered[path]
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise VerificationError(f"'{path}' on disk differs from the program that was lowered; write it again")
        try:
            program = deserialize_pte_binary(data).program
        except Exception as exc:
            raise VerificationError(f"'{path}' is not a readable ExecuTorch program: {exc}") from exc
        ops = [f"{o.name}.{o.overload}" if o.overload else o.name for o in program.execution_plan[0].operators]
        if ops != lowered.operators:
            raise VerificationError(f"'{path}' holds the operators {ops}, the lowered program {lowered.operators}")
        return HostProgram(lowered.program, lowered.input_qparams, self.run.int8_input)

    def describe(self, int8: nn.Module, config: QuantConfig) -> dict[str, Any]:
        from ...quant.graph import summarize

        return {**summarize(int8).to_dict(), "cpu": self.run.cpu}

    def float_layers(self, int8: nn.Module) -> list[str]:
        from ...quant.graph import summarize

        return summarize(int8).float_layers

    def diagnose(self, fm: FloatModel, int8: nn.Module, x: torch.Tensor) -> dict[str, Any]:
        from ...evaluate import layer_sqnr

        rows = layer_sqnr(fm.graph, int8, x)
        return {"layer_sqnr_worst5": rows[:5], "layer_sqnr_all": rows}

    def companions(self, artifact: Path, info, details: dict[str, Any]) -> list[Path]:
        header = artifact.with_name(artifact.name[: -len(".pte")] + "_pte.h")
        write_header(header, artifact.read_bytes(), name=artifact.stem, input_shape=[1, 3, info.resolution,
                     info.resolution], input_qparams=details["input_qparams"], int8_input=details["int8_input"],
                     arena_bytes=details["memory"]["ram"]["arena_bytes"], labels=list(info.classes), cpu=details["cpu"])
        return [header]


def backend(spec, run) -> CortexMBackend:
    return CortexMBackend(spec, run)
