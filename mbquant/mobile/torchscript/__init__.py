"""``ts-qnnpack`` (phones) and ``ts-x86`` (servers): TorchScript .pt and lite-interpreter .ptl artifacts from the
legacy eager engine (``torch.ao.quantization``, deprecated upstream; it is used nowhere else in mbquant).

engine.py (qconfig, prepare/convert, the quantized-engine context, ReLU6 units, eager QAT), fuse.py (eager
fusion), script.py (script + atomic .pt/.ptl), reload.py (the artifact in a fresh process).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from ...config import QuantConfig
from ...quant.export import FloatModel
from ..backend import Backend, Predictor, Written
from . import engine as eager
from .fuse import fuse
from .reload import FreshProcessModel
from .script import DEPRECATION_NOTE, to_torchscript, try_optimize_for_mobile, write_pt, write_ptl

ENGINE_OF = {"ts-qnnpack": "qnnpack", "ts-x86": "x86"}

__all__ = ["ENGINE_OF", "FreshProcessModel", "TorchScriptBackend", "backend", "fuse"]


class TorchScriptBackend(Backend):
    @property
    def engine(self) -> str:
        return ENGINE_OF[self.name]

    def session(self) -> ContextManager:
        return eager.quantized_engine(self.engine)

    def to_eval(self, prepared: nn.Module) -> None:
        prepared.eval()

    def prepare(self, fm: FloatModel, config: QuantConfig) -> nn.Module:
        return eager.prepare(fm.module, config, self.engine)

    def prepare_qat(self, fm: FloatModel, config: QuantConfig) -> eager.EagerQat:
        return eager.EagerQat(fm.module, config, self.engine)

    def convert(self, prepared: nn.Module) -> nn.Module:
        return eager.convert(prepared)

    def write(self, model: nn.Module, stem: Path, *, resolution: int) -> list[Written]:
        sm, how = to_torchscript(model, resolution, engine=self.engine)
        mobile, not_optimized = try_optimize_for_mobile(sm)
        warnings = [DEPRECATION_NOTE]
        notes = [not_optimized] if not_optimized else []
        if how != "script":
            notes.append(f"the INT8 model was traced, not scripted: {how}")
        details = {"engine": self.engine, "script_method": how, "optimize_for_mobile": not_optimized is None,
                   "warnings": warnings, "notes": notes}
        pt = write_pt(sm, Path(f"{stem}.pt"))
        ptl = write_ptl(mobile, Path(f"{stem}.ptl"))
        return [Written(pt, {**details, "loader": "torch.jit.load"}),
                Written(ptl, {**details, "loader": "torch.jit.mobile._load_for_lite_interpreter"})]

    def open(self, path: Path, sidecar) -> Predictor:
        """The .pt (torch.jit.load) or .ptl (lite interpreter) in a fresh process, under the engine it was made for."""
        engine = (sidecar.details.get("engine") if sidecar is not None else None) or self.engine
        return FreshProcessModel(path, engine=engine, lite=Path(path).suffix == ".ptl", threads=torch.get_num_threads())

    def describe(self, int8: nn.Module, config: QuantConfig) -> dict[str, Any]:
        return {"engine": self.engine, "weights": eager.weight_granularity(int8).to_dict(),
                "relu6": "fused (clamp)" if config.fuse_relu6 else "separate"}


def backend(spec, options) -> TorchScriptBackend:
    return TorchScriptBackend(spec, options)
