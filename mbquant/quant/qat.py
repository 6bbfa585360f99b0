"""Quantization-aware training stages (PT2E): export in train mode -> prepare_qat -> (train) -> convert.

:class:`QatGraph` holds the fake-quantized graph and the switches a QAT schedule needs. An exported graph
ignores ``.train()``/``.eval()``; modes are graph rewrites (``move_exported_model_to_train/eval``), and
freezing BN statistics rewrites the training-mode ``batch_norm`` ops to their eval form (running
statistics used and left untouched) while the rest of the graph trains.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.fx import GraphModule

from ..config import QuantConfig
from ..errors import QuantizationError
from .fuse import BN_OPS
from .graph import count_targets
from .ptq import convert as convert_ptq
from .ptq import export_float
from .quantizer import build_quantizer
from .targets import Target

MOVING_AVERAGE = 0.01  # the fused fake-quantize's averaging constant while training


def fake_quants(gm: nn.Module) -> dict[str, nn.Module]:
    """The fake-quantize modules ``prepare_qat_pt2e`` inserted (activations and weights)."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    return {name: m for name, m in gm.named_modules() if isinstance(m, FakeQuantizeBase)}


def _bn_nodes(gm: GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS]


class QatGraph:
    """A fake-quantized PT2E graph plus its schedule switches (mode, BN freeze, observer freeze)."""

    def __init__(self, module: GraphModule):
        self.module = module
        self.bn_frozen = False
        self.observers_frozen = False

    def set_mode(self, train: bool) -> None:
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        with _keep_rng():
            if not train:
                move_exported_model_to_eval(self.module)
                return
            move_exported_model_to_train(self.module)
            if self.bn_frozen:
                self._bn_to_eval()

    def _bn_to_eval(self) -> None:
        from torchao.quantization.pt2e.export_utils import _replace_batchnorm

        with _keep_rng():
            _replace_batchnorm(self.module, train_to_eval=True)

    def freeze_bn(self) -> None:
        """Use (and stop updating) BN running statistics from now on, in train mode too."""
        self.bn_frozen = True
        if self.training:
            self._bn_to_eval()

    def freeze_observers(self) -> None:
        """Keep every activation and weight range (scale/zero-point) as it is now."""
        for fq in fake_quants(self.module).values():
            fq.disable_observer()
        self.observers_frozen = True

    def enable_fake_quant(self, on: bool = True) -> None:
        for fq in fake_quants(self.module).values():
            fq.enable_fake_quant(on)

    @property
    def training(self) -> bool:
        from torchao.quantization.pt2e.export_utils import _EXPORTED_TRAINING_ATTR

        return bool(getattr(self.module, _EXPORTED_TRAINING_ATTR, True))

    def bn_training_ops(self) -> int:
        """How many batch_norm ops compute batch statistics (0 when BN is frozen or in eval mode)."""
        return sum(1 for n in _bn_nodes(self.module) if _bn_is_training(n))

    def init_ranges(self, batches: Iterable[torch.Tensor]) -> int:
        """Set every range from real images before training: eval mode, fake-quant off, each observer's
        range the mean of the per-batch min/max (the moving-average observer with weights 1/k).

        Returns the number of samples seen."""
        self.set_mode(False)
        self.enable_fake_quant(False)
        observers = [fq.activation_post_process for fq in fake_quants(self.module).values()]
        seen = 0
        with torch.no_grad():
            for k, x in enumerate(batches):
                for obs in observers:
                    obs.averaging_constant = 1.0 / (k + 1)
                self.module(x)
                seen += len(x)
        for obs in observers:
            obs.averaging_constant = MOVING_AVERAGE
        for fq in fake_quants(self.module).values():
            _sync_qparams(fq)
        self.enable_fake_quant(True)
        return seen

    def convert(self) -> GraphModule:
        """Fold BN into the convs and emit quantize/dequantize pairs (checks no batch_norm is left)."""
        self.set_mode(False)
        return convert_ptq(self.module)


def _keep_rng():
    """torchao's train/eval rewrites trace their patterns with ``torch.randn`` examples; keep them from
    consuming the global RNG, so dropout and augmentation draw the same numbers after a resume."""
    return torch.random.fork_rng(devices=[])


def _sync_qparams(fq: nn.Module) -> None:
    """Write the observer's range into the fake-quantize's scale/zero-point (the fused op only does so
    while fake-quantizing)."""
    scale, zero_point = fq.calculate_qparams()
    fq.scale.resize_(scale.shape).copy_(scale)
    fq.zero_point.resize_(zero_point.shape).copy_(zero_point.to(fq.zero_point.dtype))


def _bn_is_training(node: torch.fx.Node) -> bool:
    if node.target == torch.ops.aten._native_batch_norm_legit_no_training.default:
        return False
    if node.target == torch.ops.aten.batch_norm.default:
        return bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False))
    return True


def prepare_qat(model: nn.Module, resolution: int, config: QuantConfig, target: Target) -> QatGraph:
    """Export the float model in train mode and insert fake-quantize modules as the target's quantizer
    annotates them (conv-BN kept as a pattern for training; BN is folded at convert)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    target.check(config, "pte")
    gm = export_float(model, resolution, dynamic_batch=True, train=True)
    prepared = prepare_qat_pt2e(gm, build_quantizer(config, qat=True))
    allow_exported_model_train_eval(prepared)
    if not fake_quants(prepared):
        raise QuantizationError(f"prepare_qat inserted no fake-quantize modules into {type(model).__name__}; "
                                f"nothing would be trained for INT8")
    return QatGraph(prepared)


def bn_left(gm: GraphModule) -> int:
    return count_targets(gm, BN_OPS)
