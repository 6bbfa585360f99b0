"""``pte-cortex-m``: PT2E INT8 with ExecuTorch's CortexMQuantizer -> an ExecuTorch program of CMSIS-NN INT8
kernels (``cortex_m::`` ops) for Cortex-M microcontrollers (``--target mcu --cpu cortex-m4|m7|m33|m55``).

quantizer.py (CortexMQuantizer, and its QAT form), lower.py (lowering, int8 input, dead constants), memory.py (flash/RAM report, best-fit planner), program.py (a
``.pte`` deserialized and executed instruction by instruction), reference.py (the cortex_m:: kernels' arithmetic,
batched), firmware.py (C header). The ``.pte`` cannot run on this host's ExecuTorch runtime (its kernels are
CMSIS-NN's): ``open`` reads the file and runs ITS instructions with the host reference kernels.

QAT trains the channels-last graph with BN folded (CortexMQuantizer has no conv-BN pattern) under the quantizer's
own patterns with fake-quantize specs of the same numerics; it converts and lowers exactly as PTQ.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import compat
from ...atomic import write_bytes
from ...config import QuantConfig
from ...errors import VerificationError
from ...quant import pt2e
from ...quant.export import FloatModel
from ...quant.qat import QatGraph
from ..backend import Predictor, Written
from ..pt2e import PT2EBackend
from .firmware import write_header
from .lower import Lowered, lower, prune_unused_constants
from .reference import HostProgram, conv, requantize

__all__ = ["CortexMBackend", "HostProgram", "Lowered", "backend", "conv", "lower", "prune_unused_constants",
           "requantize"]

NOTE = "accuracy is the host reference of the cortex_m:: kernels' arithmetic, run on the .pte's own instructions"


class CortexMBackend(PT2EBackend):
    channels_last = True

    def quantizer(self, fm: FloatModel, config: QuantConfig, *, qat: bool):
        from .quantizer import build_quantizer

        return build_quantizer(qat=qat)

    def prepare_qat(self, fm: FloatModel, config: QuantConfig) -> QatGraph:
        """The channels-last graph with BN folded into the convs (CortexMQuantizer's patterns have no conv-BN:
        training starts from BN's running statistics, as a QAT schedule that freezes BN does later), in train mode
        (dropout), fake-quantized with the Cortex-M QAT specs (:mod:`.quantizer`)."""
        from torchao.quantization.pt2e import move_exported_model_to_train

        graph = fm.graph_copy(channels_last=True)
        compat.fuse_conv_bn(graph)
        graph.recompile()
        with torch.random.fork_rng(devices=[]), compat.pattern_graphs_once():
            move_exported_model_to_train(graph)
        return pt2e.prepare_qat(graph, self.quantizer(fm, config, qat=True))

    def write(self, model: nn.Module, stem: Path, *, resolution: int) -> list[Written]:
        cpu, int8_input = self.options["cpu"], self.options["int8_input"]
        t = time.perf_counter()
        lowered = lower(model, resolution, cpu=cpu, int8_input=int8_input)
        seconds = round(time.perf_counter() - t, 1)
        path = write_bytes(Path(f"{stem}.pte"), lowered.buffer)
        details = {"lower_seconds": seconds, "cpu": cpu, "int8_input": int8_input,
                   "input_qparams": lowered.input_qparams, "operators": lowered.operators,
                   "non_int8_ops": lowered.non_int8_ops, "memory": lowered.memory, "notes": [NOTE]}
        return [Written(path, details)]

    def open(self, path: Path, sidecar) -> Predictor:
        """The ``.pte`` at ``path`` read from disk and executed instruction by instruction with the host reference
        kernels; its input scale and zero point (``--int8-input`` programs) come from the sidecar."""
        path = Path(path)
        if not path.is_file():
            raise VerificationError(f"program '{path}' does not exist; write it before opening it")
        details = sidecar.details if sidecar is not None else {}
        program = HostProgram(path.read_bytes(), details.get("input_qparams") or {}, source=str(path))
        recorded = details.get("operators")
        if recorded is not None and recorded != program.operators:
            raise VerificationError(f"'{path}' holds the operators {program.operators}, but its sidecar describes a "
                                    f"program of {recorded}; keep each program with its own sidecar")
        return program

    def gate_failures(self, result, run) -> list[str]:
        name, d = f"{result.file} ({result.backend})", result.details
        out = []
        if self.options["strict"] and d.get("non_int8_ops"):
            out.append(f"{name}: ops that are not INT8 kernels: {', '.join(d['non_int8_ops'])} (--strict); the "
                       f"program would run them in float or not at all on the device")
        memory = d.get("memory")
        if not memory:
            return out
        flash_kb, ram_kb = self.options["flash_kb"], self.options["ram_kb"]
        flash = memory["flash"]["program_bytes"]
        if flash_kb is not None and flash > flash_kb * 1024:
            big = ", ".join(f"{c['dtype']} {c['shape']} {c['bytes']:,} B" for c in memory["flash"]["largest_constants"][:3])
            out.append(f"{name}: the program is {flash:,} B, over --flash-kb {flash_kb:g} ({flash_kb * 1024:,.0f} B); "
                       f"largest constants: {big}; shrink the width (--width-mult of the trained model) or the classes")
        ram = memory["ram"]["arena_bytes"]
        if ram_kb is not None and ram > ram_kb * 1024:
            live = ", ".join(f"{t['written_by']} {t['shape']} {t['bytes']:,} B" for t in memory["ram"]["peak_tensors"][:3])
            out.append(f"{name}: the RAM peak (planned arena: activations, scratch, input/output) is {ram:,} B, over "
                       f"--ram-kb {ram_kb:g} ({ram_kb * 1024:,.0f} B); at the peak, set by {memory['ram']['peak_set_by']}: "
                       f"{live}; shrink the resolution or the width, or pass --int8-input")
        return out

    def summary_lines(self, result) -> list[str]:
        mem = result.details.get("memory")
        if not mem:
            return []
        f, r = mem["flash"], mem["ram"]
        return [f"{result.file}: flash {f['program_bytes']:,} B (constants "
                + ", ".join(f"{k} {v:,} B" for k, v in f["constants_by_dtype"].items())
                + f"); RAM peak {r['arena_bytes']:,} B planned (input {r['input']['bytes']:,} B {r['input']['dtype']}, "
                f"scratch up to {(r['scratch_max'] or {}).get('bytes', 0):,} B), set by {r['peak_set_by']}; "
                f"{result.details.get('cpu', '')}; accuracy from the host reference kernels, not a device"]

    def describe(self, int8: nn.Module, config: QuantConfig) -> dict[str, Any]:
        return {**super().describe(int8, config), "cpu": self.options["cpu"]}

    def companions(self, artifact: Path, info, details: dict[str, Any]) -> list[Path]:
        header = artifact.with_name(artifact.name[: -len(".pte")] + "_pte.h")
        write_header(header, artifact.read_bytes(), name=artifact.stem, input_shape=[1, 3, info.resolution,
                     info.resolution], input_qparams=details["input_qparams"], int8_input=details["int8_input"],
                     arena_bytes=details["memory"]["ram"]["arena_bytes"], labels=list(info.classes), cpu=details["cpu"])
        return [header]


def backend(spec, options) -> CortexMBackend:
    return CortexMBackend(spec, options)
