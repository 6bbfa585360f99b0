"""``pte-xnnpack``: PT2E INT8 -> ExecuTorch program with the XNNPACK delegate (ARM phones).

quantizer.py (composed quantizer), lower.py (lowering, delegation, atomic write), runtime.py (PteModel).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from ...config import QuantConfig
from ...quant import pt2e
from ...quant.export import FloatModel
from ...quant.keep_float import resolve_names
from ...quant.qat import QatGraph
from ..backend import Backend, Predictor, Written
from .lower import Delegation, Lowered, delegation_of, lower, write_pte
from .quantizer import build_quantizer
from .runtime import PteModel, runtime_threads

__all__ = ["Delegation", "Lowered", "PteModel", "XnnpackBackend", "backend", "build_quantizer", "delegation_of",
           "lower", "runtime_threads", "write_pte"]


class XnnpackBackend(Backend):
    def _quantizer(self, fm: FloatModel, config: QuantConfig, qat: bool):
        layers = resolve_names(config.keep_float or (), fm.module, fm.graph)
        return build_quantizer(config, layers, qat=qat)

    def prepare(self, fm: FloatModel, config: QuantConfig) -> GraphModule:
        return pt2e.prepare(fm.graph_copy(), self._quantizer(fm, config, qat=False))

    def prepare_qat(self, fm: FloatModel, config: QuantConfig) -> QatGraph:
        return pt2e.prepare_qat(fm.train_graph(), self._quantizer(fm, config, qat=True))

    def convert(self, prepared: nn.Module) -> GraphModule:
        return pt2e.convert(prepared)

    def write(self, model: nn.Module, stem: Path, *, resolution: int) -> list[Written]:
        t = time.perf_counter()
        lowered = lower(model, resolution)
        seconds = round(time.perf_counter() - t, 1)
        path = write_pte(lowered, Path(f"{stem}.pte"))
        return [Written(path, {"lower_seconds": seconds, "delegation": lowered.delegation.to_dict()},
                        delegated=lowered.delegation.ratio)]

    def load(self, path: Path) -> Predictor:
        return PteModel(path)

    def describe(self, int8: nn.Module, config: QuantConfig) -> dict[str, Any]:
        from ...quant.graph import summarize

        return summarize(int8).to_dict()

    def float_layers(self, int8: nn.Module) -> list[str]:
        from ...quant.graph import summarize

        return summarize(int8).float_layers

    def diagnose(self, fm: FloatModel, int8: nn.Module, x: torch.Tensor) -> dict[str, Any]:
        from ...evaluate import layer_sqnr

        rows = layer_sqnr(fm.graph, int8, x)
        return {"layer_sqnr_worst5": rows[:5], "layer_sqnr_all": rows}


def backend(spec, run) -> XnnpackBackend:
    return XnnpackBackend(spec, run)
