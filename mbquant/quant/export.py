"""The float model of a run and its ``torch.export`` graph, exported once and shared by every stage."""
from __future__ import annotations

import copy
import functools
import inspect

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import QuantizationError

MAX_BATCH = 1024


def example_input(resolution: int, batch: int = 2) -> torch.Tensor:
    """A shape-only example for torch.export (never used as calibration data)."""
    return torch.zeros(batch, 3, resolution, resolution)


def export_float(model: nn.Module, resolution: int, *, train: bool = False,
                 channels_last: bool = False) -> GraphModule:
    """``torch.export`` a copy of the float model in eval mode (``train``: train mode, for QAT), batch dimension
    dynamic up to MAX_BATCH; ``channels_last``: model and example in NHWC (what CMSIS-NN kernels take)."""
    model = copy.deepcopy(model).train(train)
    x = example_input(resolution)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    name = next(iter(inspect.signature(model.forward).parameters))
    dyn = {name: {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}
    try:
        ep = torch.export.export(model, (x,), dynamic_shapes=dyn)
    except Exception as exc:
        raise QuantizationError(f"torch.export failed for {type(model).__name__} at {resolution}x{resolution}: "
                                f"{type(exc).__name__}: {str(exc)[:300]}; the model must be export-traceable") from exc
    return ep.module(check_guards=False) if channels_last else ep.module()


class FloatModel:
    """The float model of a run (eval mode), its resolution and its exported eval graph (exported on first use,
    once). Stages that change a graph work on a copy: :meth:`graph_copy`."""

    def __init__(self, module: nn.Module, resolution: int):
        self.module = module.eval()
        self.resolution = int(resolution)

    @functools.cached_property
    def graph(self) -> GraphModule:
        """The exported eval-mode graph (batch dimension dynamic). Do not mutate it: use :meth:`graph_copy`."""
        return export_float(self.module, self.resolution)

    @functools.cached_property
    def graph_channels_last(self) -> GraphModule:
        """The same export in NHWC (without the guard node, which the Cortex-M passes do not take)."""
        return export_float(self.module, self.resolution, channels_last=True)

    def graph_copy(self, *, channels_last: bool = False) -> GraphModule:
        return copy.deepcopy(self.graph_channels_last if channels_last else self.graph)

    def train_graph(self) -> GraphModule:
        """A train-mode export (BN batch statistics, dropout) for quantization-aware training."""
        return export_float(self.module, self.resolution, train=True)
