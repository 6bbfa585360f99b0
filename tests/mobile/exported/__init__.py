"""A backend that lives outside mbquant's tree, registered by its tests alone: the proof that a new backend is one
folder and one row. It quantizes with ExecuTorch's stock XNNPACK quantizer on the PT2E road, writes the INT8 graph
with ``torch.export.save`` (``.pt2``) and opens it from the file with ``torch.export.load``."""
from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from mbquant.errors import VerificationError
from mbquant.mobile.backend import Predictor, Written
from mbquant.mobile.pt2e import PT2EBackend
from mbquant.mobile.spec import BackendSpec, Option

_STOCK = {"observer": "histogram", "fuse_relu6": False, "keep_float": (), "bias_correction": False, "equalize": False}

ROW = BackendSpec(
    "test-exported", ("phone", "x86"), "pt2", "torch.export.load (the INT8 ExportedProgram in this process)",
    __name__, (".pt2",), ("per-channel", "per-tensor"), ("histogram", "minmax"), keep_float=False,
    bias_correction=True, float_program=False,
    recipes=MappingProxyType({"best": MappingProxyType({**_STOCK, "bias_correction": True}),
                              "stock": MappingProxyType(_STOCK),
                              "qat": MappingProxyType({**_STOCK, "observer": "moving-average", "fuse_relu6": True})}),
    options=(Option("max_program_kb", "number", None, "fail when the .pt2 is larger (KiB)", lo=0.0, lo_open=True),),
    sweep_variants=MappingProxyType({"stock": MappingProxyType({"recipe": "stock"}), "best": MappingProxyType({})}),
    sweep_default=("stock", "best"))


class ExportedProgramModel(Predictor):
    runtime = ROW.runtime

    def __init__(self, path: Path):
        try:
            self.module = torch.export.load(str(path)).module()
        except Exception as exc:
            raise VerificationError(f"'{path}' is not a torch.export program: {type(exc).__name__}: "
                                    f"{str(exc)[:200]}") from exc

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x).float()


class ExportedBackend(PT2EBackend):
    def quantizer(self, fm, config, *, qat: bool):
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                               get_symmetric_quantization_config)

        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(
            is_per_channel=config.granularity == "per-channel", is_qat=qat))

    def write(self, model: nn.Module, stem: Path, *, resolution: int) -> list[Written]:
        from mbquant._io import atomic_path

        path = Path(f"{stem}.pt2")
        ep = torch.export.export(model, (torch.zeros(2, 3, resolution, resolution),),
                                 dynamic_shapes={next(iter(ep_args(model))): {0: torch.export.Dim("batch", max=1024)}})
        with atomic_path(path) as tmp:
            torch.export.save(ep, str(tmp))
        return [Written(path, {"exported_with": f"torch {torch.__version__}"})]

    def open(self, path: Path, sidecar) -> Predictor:
        return ExportedProgramModel(Path(path))

    def gate_failures(self, result, run) -> list[str]:
        bound = self.options["max_program_kb"]
        if bound is not None and result.bytes > bound * 1024:
            return [f"{result.file} ({result.backend}): {result.bytes:,} B is over --max-program-kb {bound:g}"]
        return []

    def summary_lines(self, result) -> list[str]:
        return [f"{result.file}: an ExportedProgram of {result.bytes:,} B (test backend)"]


def ep_args(model: nn.Module) -> list[str]:
    import inspect

    return [n for n in inspect.signature(model.forward).parameters]


def backend(spec, options) -> ExportedBackend:
    return ExportedBackend(spec, options)
