"""What the PT2E backends share (pte-xnnpack, pte-cortex-m, and any backend built on torch.export + torchao):
prepare with the backend's quantizer on a copy of the exported graph, QAT prepare, convert (BN folded, checked),
the INT8 graph's structure facts, its float layers and per-layer SQNR against the float model."""
from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from ..config import QuantConfig
from ..quant import pt2e
from ..quant.export import FloatModel
from ..quant.qat import QatGraph
from .backend import Backend


class PT2EBackend(Backend):
    channels_last: bool = False            # export NHWC (what CMSIS-NN kernels take)

    @abc.abstractmethod
    def quantizer(self, fm: FloatModel, config: QuantConfig, *, qat: bool):
        """The torchao Quantizer for a resolved ``config``."""

    def prepare(self, fm: FloatModel, config: QuantConfig) -> GraphModule:
        return pt2e.prepare(fm.graph_copy(channels_last=self.channels_last), self.quantizer(fm, config, qat=False))

    def prepare_qat(self, fm: FloatModel, config: QuantConfig) -> QatGraph:
        return pt2e.prepare_qat(fm.train_graph(), self.quantizer(fm, config, qat=True))

    def convert(self, prepared: nn.Module) -> GraphModule:
        return pt2e.convert(prepared)

    def describe(self, int8: nn.Module, config: QuantConfig) -> dict[str, Any]:
        from ..quant.graph import summarize

        return summarize(int8).to_dict()

    def float_layers(self, int8: nn.Module) -> list[str]:
        from ..quant.graph import summarize

        return summarize(int8).float_layers

    def diagnose(self, fm: FloatModel, int8: nn.Module, x: torch.Tensor) -> dict[str, Any]:
        from ..evaluate import layer_sqnr

        rows = layer_sqnr(fm.graph, int8, x)
        return {"layer_sqnr_worst5": rows[:5], "layer_sqnr_all": rows}
