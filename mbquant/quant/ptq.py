"""Post-training static quantization stages (PT2E): export -> prepare -> (calibrate) -> convert."""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from torch.fx import GraphModule

from ..config import QuantConfig
from ..errors import QuantizationError
from .fuse import BN_OPS
from .graph import count_targets
from .quantizer import build_quantizer
from .targets import Target

MAX_BATCH = 1024


def example_input(resolution: int, batch: int = 2) -> torch.Tensor:
    """A shape-only example for torch.export (never used as calibration data)."""
    return torch.zeros(batch, 3, resolution, resolution)


def export_float(model: nn.Module, resolution: int, *, dynamic_batch: bool = True, train: bool = False) -> GraphModule:
    """``torch.export`` the float model in eval mode (``train``: train mode, for QAT), batch dimension dynamic
    up to MAX_BATCH."""
    model = copy.deepcopy(model).train(train)
    x = example_input(resolution, 2 if dynamic_batch else 1)
    name = next(iter(inspect.signature(model.forward).parameters))
    dyn = {name: {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}} if dynamic_batch else None
    try:
        ep = torch.export.export(model, (x,), dynamic_shapes=dyn)
    except Exception as exc:
        raise QuantizationError(f"torch.export failed for {type(model).__name__} at {resolution}x{resolution}: "
                                f"{type(exc).__name__}: {str(exc)[:300]}; the model must be export-traceable") from exc
    return ep.module()


def prepare(model: nn.Module, resolution: int, config: QuantConfig, target: Target) -> GraphModule:
    """Export, fold BN for PTQ and insert observers as the target's quantizer annotates them."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    target.check(config, "pte")
    gm = export_float(model, resolution, dynamic_batch=target.dynamic_batch)
    return prepare_pt2e(gm, build_quantizer(config))


def convert(prepared: GraphModule) -> GraphModule:
    """Replace observers by quantize/dequantize pairs; check that no batch_norm is left."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    int8 = convert_pt2e(prepared)
    move_exported_model_to_eval(int8)
    left = count_targets(int8, BN_OPS)
    if left:
        raise QuantizationError(f"{left} batch_norm ops are left after convert (BN was not folded into conv); "
                                f"put each BatchNorm directly after its conv")
    return int8
