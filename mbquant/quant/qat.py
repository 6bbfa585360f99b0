"""Quantization-aware training state shared by every backend: :class:`QatModel` (the switches a QAT
schedule needs: mode, BN freeze, observer freeze, range init) and :class:`QatGraph`, the PT2E one.

An exported graph ignores ``.train()``/``.eval()``; modes are graph rewrites (``move_exported_model_to_train/eval``),
and freezing BN statistics rewrites the training-mode ``batch_norm`` ops to their eval form (running
statistics used and left untouched) while the rest of the graph trains.
"""
from __future__ import annotations

import abc
import copy
from typing import Callable, Iterable

import torch
from torch import nn
from torch.fx import GraphModule

from .. import compat
from ..errors import QuantizationError
from .layerwalk import attr
from .ops import BN_OPS, weighted_layers


def fake_quants(module: nn.Module) -> dict[str, nn.Module]:
    """The fake-quantize modules of a QAT model (activations and weights; PT2E's or the eager engine's)."""
    return {name: m for name, m in module.named_modules()
            if hasattr(m, "activation_post_process") and hasattr(m, "fake_quant_enabled") and hasattr(m, "scale")}


def _bn_nodes(gm: GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS]


class QatModel(abc.ABC):
    """A fake-quantized model plus the switches a QAT schedule needs (mode, BN freeze, observer freeze,
    range init). :class:`QatGraph` is the PT2E one; the eager engine's (TorchScript path) lives in eager.py."""

    module: nn.Module
    bn_frozen: bool = False
    observers_frozen: bool = False

    @abc.abstractmethod
    def set_mode(self, train: bool) -> None:
        """Train or eval mode (BN stays frozen after :meth:`freeze_bn`)."""

    @abc.abstractmethod
    def _freeze_bn(self) -> None:
        """Make BN use (and stop updating) its running statistics."""

    @abc.abstractmethod
    def convert(self) -> nn.Module:
        """The INT8 model (BN folded)."""

    def converted_copy(self) -> nn.Module:
        """The INT8 model :meth:`convert` would give now, this model left as it is (the eager engine's convert
        already leaves it; the PT2E graph copies itself first)."""
        return self.convert()

    def freeze_bn(self) -> None:
        """Use (and stop updating) BN running statistics from now on, in train mode too."""
        self._freeze_bn()
        self.bn_frozen = True

    def freeze_observers(self) -> None:
        """Keep every activation and weight range (scale/zero-point) as it is now."""
        for fq in fake_quants(self.module).values():
            fq.disable_observer()
        self.observers_frozen = True

    def enable_fake_quant(self, on: bool = True) -> None:
        for fq in fake_quants(self.module).values():
            fq.enable_fake_quant(on)

    def init_ranges(self, batches: Iterable[torch.Tensor], observer: Callable[..., nn.Module] | None = None) -> int:
        """Set every range from real images before training (eval mode, fake-quant off).

        ``observer``: the constructor of the post-training recipe's activation observer (percentile, histogram):
        each activation range is then the one that observer finds on these images, as post-training quantization
        does, and the model starts where PTQ starts. ``None``: each range is the mean of the per-batch min/max (the
        moving-average observer with weights 1/k). Weight ranges are their min/max either way.

        Returns the number of samples seen."""
        self.set_mode(False)
        self.enable_fake_quant(False)
        fqs = fake_quants(self.module)
        moving = {name: fq.activation_post_process for name, fq in fqs.items()
                  if hasattr(fq.activation_post_process, "averaging_constant")}   # not fixed-qparams ones
        constants = {name: obs.averaging_constant for name, obs in moving.items()}
        recipe = {name: observer(dtype=obs.dtype, qscheme=obs.qscheme, quant_min=obs.quant_min,
                                 quant_max=obs.quant_max)
                  for name, obs in moving.items() if observer is not None and _is_activation(obs)}
        hooks = [fqs[name].register_forward_pre_hook(_feed(obs)) for name, obs in recipe.items()]
        seen = 0
        try:
            with torch.no_grad():
                for k, x in enumerate(batches):
                    for obs in moving.values():
                        obs.averaging_constant = 1.0 / (k + 1)
                    self.module(x)
                    seen += len(x)
        finally:
            for h in hooks:
                h.remove()
            for name, c in constants.items():
                moving[name].averaging_constant = c
        if seen == 0:
            raise QuantizationError("no calibration images reached the model; QAT ranges cannot be initialised")
        qparams = {name: obs.calculate_qparams() for name, obs in recipe.items()}   # once: a histogram's is a search
        for name, (scale, zero_point) in qparams.items():
            _take_range(moving[name], scale, zero_point)
        for fq in fqs.values():
            _sync_qparams(fq)
        for name, (scale, zero_point) in qparams.items():   # exactly the recipe's step and zero point (no round trip)
            fqs[name].scale.copy_(scale.reshape(fqs[name].scale.shape))
            fqs[name].zero_point.copy_(zero_point.reshape(fqs[name].zero_point.shape).to(fqs[name].zero_point.dtype))
        self.enable_fake_quant(True)
        return seen


def _is_activation(obs: nn.Module) -> bool:
    """Activation observers are per-tensor affine; weights are symmetric (per channel or per tensor)."""
    return getattr(obs, "qscheme", None) == torch.per_tensor_affine


def _feed(obs: nn.Module):
    def hook(module, args):
        obs(args[0].detach())
        # None: the fake-quantize's input is left as it is

    return hook


def _take_range(moving: nn.Module, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    """Give a moving-average observer the range whose qparams are ``scale``/``zero_point`` (the recipe observer's;
    training then moves it from there while observers are on)."""
    scale, zero_point = scale.reshape(()).double(), zero_point.reshape(()).double()
    lo = (moving.quant_min - zero_point) * scale
    hi = (moving.quant_max - zero_point) * scale
    moving.min_val.resize_(()).copy_(lo.to(moving.min_val.dtype))
    moving.max_val.resize_(()).copy_(hi.to(moving.max_val.dtype))


class QatGraph(QatModel):
    """A fake-quantized PT2E graph. Modes are graph rewrites; freezing BN rewrites the training-mode
    ``batch_norm`` ops to their eval form while the rest of the graph trains."""

    def __init__(self, module: GraphModule, convert: Callable[[GraphModule], GraphModule],
                 constants: compat.ModeConstants | None = None):
        self.module = module
        self._convert = convert
        # each BN's own momentum and eps and each dropout's p, put back after every torchao rewrite
        self._constants = constants or compat.ModeConstants({}, ())

    def set_mode(self, train: bool) -> None:
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        with _keep_rng(), compat.pattern_graphs_once():
            if not train:
                move_exported_model_to_eval(self.module)
                compat.restore_mode_constants(self.module, self._constants)
                return
            move_exported_model_to_train(self.module)
            compat.restore_mode_constants(self.module, self._constants)
            if self.bn_frozen:
                self._bn_to_eval()

    def _bn_to_eval(self) -> None:
        from ..compat import replace_batchnorm

        with _keep_rng():
            replace_batchnorm(self.module, train_to_eval=True)
        compat.restore_mode_constants(self.module, self._constants)

    def _freeze_bn(self) -> None:
        if self.training:
            self._bn_to_eval()

    @property
    def training(self) -> bool:
        from ..compat import exported_training

        return exported_training(self.module)

    def bn_training_ops(self) -> int:
        """How many batch_norm ops compute batch statistics (0 when BN is frozen or in eval mode)."""
        return sum(1 for n in _bn_nodes(self.module) if _bn_is_training(n))

    def convert(self) -> GraphModule:
        """Fold BN into the convs and emit quantize/dequantize pairs (checks no batch_norm is left)."""
        self.set_mode(False)
        compat.eps_into_running_var(self.module, self._constants.bn)   # torchao folds with its own eps
        return self._convert(self.module)

    def converted_copy(self) -> GraphModule:
        """The INT8 graph :meth:`convert` would give now, from a copy (this model is left as it is, in eval mode)."""
        twin = QatGraph(copy.deepcopy(self.module), self._convert, self._constants)
        return twin.convert()

    def output_offsets(self) -> list[torch.Tensor]:
        """For every conv/linear layer, in graph order (the order of the converted graph's layers), the parameter
        that adds a per-channel offset to its output once BN is folded: the bias of the batch norm the conv feeds
        (convert folds it into the conv's bias), else the layer's own bias."""
        offsets = []
        for layer in weighted_layers(self.module):
            bn = _bn_after(layer)
            bias = bn.args[2] if bn is not None else (layer.args[2] if len(layer.args) > 2 else None)
            if isinstance(bias, torch.fx.Node) and bias.op == "call_module" and len(bias.args) == 1:
                bias = bias.args[0]              # the bias's fake-quantize (an INT32 bias): shift what it reads
            if not isinstance(bias, torch.fx.Node) or bias.op != "get_attr":
                raise QuantizationError(f"QAT graph: layer {layer.name} has no bias or batch-norm bias to offset its "
                                        f"output; start from float biases (--init-biases float)")
            offsets.append(attr(self.module, bias.target))
        return offsets

    def shift_outputs(self, shifts: list[torch.Tensor]) -> None:
        """Subtract ``shifts[i]`` (per channel) from the output of the i-th conv/linear layer (its
        :meth:`output_offsets`): bias correction carried into the training graph."""
        offsets = self.output_offsets()
        if len(shifts) != len(offsets):
            raise QuantizationError(f"QAT graph: {len(shifts)} shifts for {len(offsets)} conv/linear layers")
        with torch.no_grad():
            for t, shift in zip(offsets, shifts):
                if shift.shape != t.shape:
                    raise QuantizationError(f"QAT graph: a shift of shape {tuple(shift.shape)} for an offset of shape "
                                            f"{tuple(t.shape)}")
                t.sub_(shift.to(t.device, t.dtype))


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


def _bn_after(layer: torch.fx.Node, hops: int = 4) -> torch.fx.Node | None:
    """The batch norm a conv feeds in a QAT graph (conv -> div by the BN scale -> [add bias] -> batch_norm), or
    None. Only single-user chains count: a value used elsewhere is not what the BN shifts."""
    node = layer
    for _ in range(hops):
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
        if node.op == "call_function" and node.target in BN_OPS:
            return node
    return None


def _bn_is_training(node: torch.fx.Node) -> bool:
    if node.target == torch.ops.aten._native_batch_norm_legit_no_training.default:
        return False
    if node.target == torch.ops.aten.batch_norm.default:
        return bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False))
    return True
