"""The legacy eager engine (``torch.ao.quantization``) behind the TorchScript backends (ts-qnnpack, ts-x86).

Stages as in the PT2E road: ``prepare`` (fuse with :func:`mbquant.quant.fuse`, wrap in
QuantStub/DeQuantStub, attach a qconfig, insert observers or fake-quants), ``calibrate`` (real images,
eval, no_grad, every observer must see data), ``convert`` (INT8 eager modules; BN folded) and the
``quantize_eager`` shortcut. :class:`EagerQat` is the QAT adapter the trainer drives.

The quantized engine (``torch.backends.quantized.engine``) is process-global and decides how weights are
packed and which kernels run, so every stage that packs weights or runs quantized kernels runs inside
:func:`quantized_engine`, which restores the previous engine afterwards (also on errors). A converted model
records its engine in ``mbquant_engine``.

Weights are per-channel by default. Measured on this torch 2.14.1 build (single conv/linear layers,
depthwise included, against a float reference on the dequantized operands): qnnpack runs per-channel
quantized conv and linear exactly (max error 0.5 output LSB, i.e. rounding), so the phone engine gets
per-channel weights; the legacy ``get_default_qconfig("qnnpack")`` observes weights per tensor, which is what
collapses depthwise-heavy models. Weights use [-127, 127] (symmetric, XNNPACK-compatible). The x86 engine
needs 7-bit activations (``reduce_range``) on CPUs without VNNI: with full 8-bit activations its kernels
saturated by up to 34 output LSBs on this host's AVX2 CPU; with ``reduce_range`` they are exact. qnnpack's
quantized ReLU6/hardtanh/clamp kernel scrambles channels-last inputs (every qnnpack conv output) on this
build, so ReLU6 runs through :func:`relu6_any_layout` (measured: a stock ``torch.ao.nn.quantized.ReLU6``
after the convs took the shipped MobileNetV2 from 90.7% to 10.2% top-1 on 2,000 val images).

ReLU6 (``QuantConfig.fuse_relu6``): fused ("clamp") quantizes conv-BN-ReLU6 as one unit after the clamp (all
256 codes cover [0, m], m <= 6; the conv's requantization is the clamp); not fused ("separate") quantizes the
conv output over its whole signed range and clamps on that grid with a quantized ReLU6. Both keep ReLU6
semantics. Measured with
``benchmarks/torchscript_relu6.py`` (512 seeded stratified calibration images from data/train, histogram
observer, all 10,000 data/val images; top-1 drop in pp / float-vs-INT8 top-1 agreement in %):

    engine   weights       MobileNetV2 w0.5 @64 (float 90.74)   MobileNetV2 w0.35 @64 (float 89.15)
                           clamp          separate              clamp          separate
    qnnpack  per-channel   0.22 / 98.53   0.20 / 98.20          0.07 / 98.75   -0.05 / 98.23
    qnnpack  per-tensor    0.02 / 98.73   0.34 / 98.30          28.13 / 62.89  (not run)
    x86      per-channel   0.45 / 97.00   (not run)

The two ReLU6 handlings are within noise of each other on top-1 (0.2 pp is 20 images); "clamp" agrees
with the float model a little more often and needs no separate ReLU6 op, so fusion is the default. Per-tensor
weights are fine on the w0.5 checkpoint and collapse the w0.35 one (-28 pp): per-channel is the default.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.quantized as nnq
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn

from ...calibrate.observers import activation_observer, qat_weight
from ...config import QuantConfig
from ...errors import ConfigError, QuantizationError
from ...quant.qat import QatModel
from .fuse import ConvBnReLU62d, ConvReLU62d, fuse


ENGINES = ("qnnpack", "x86", "fbgemm", "onednn")
REDUCE_RANGE_ENGINES = ("x86", "fbgemm")  # 7-bit activations: the kernels overflow without VNNI
EPS = 2 ** -12


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[str]:
    """Set ``torch.backends.quantized.engine`` to ``name`` inside the block; restore the previous one after."""
    supported = list(torch.backends.quantized.supported_engines)
    if name not in supported or name == "none":
        raise ConfigError(f"quantized engine '{name}' is not available in this PyTorch build; "
                          f"supported: {', '.join(e for e in supported if e != 'none')}")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield name
    finally:
        torch.backends.quantized.engine = previous


@contextlib.contextmanager
def _legacy_api() -> Iterator[None]:
    """torch.ao.quantization warns on every call that it is deprecated; this module exists because of that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*are deprecated.*")
        yield


# --------------------------------------------------------------------------- qconfig

def qconfig(engine: str, config: QuantConfig, *, qat: bool = False) -> tq.QConfig:
    """Activations uint8 per-tensor affine (7-bit on x86), weights int8 symmetric in [-127, 127],
    per-channel or per-tensor. QAT uses moving-average fake-quants (``config.observer`` applies to PTQ only)."""
    from torch.ao.quantization import observer as ob

    if engine not in ENGINES:
        raise ConfigError(f"quantized engine '{engine}' is not supported by mbquant's eager path; "
                          f"supported: {', '.join(ENGINES)}")
    per_channel = config.granularity == "per-channel"
    act_kwargs = dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0,
                      quant_max=127 if engine in REDUCE_RANGE_ENGINES else 255, eps=EPS)
    if qat:
        act = tq.FusedMovingAvgObsFakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, **act_kwargs)
        weight = qat_weight(ob.MovingAveragePerChannelMinMaxObserver if per_channel else ob.MovingAverageMinMaxObserver,
                            tq, quant_min=-127, quant_max=127, dtype=torch.qint8, eps=EPS,
                            qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric)
        return tq.QConfig(activation=act, weight=weight)
    act = activation_observer(config, tq, **act_kwargs)
    weight = ob.per_channel_weight_observer_range_neg_127_to_127 if per_channel else ob.weight_observer_range_neg_127_to_127
    return tq.QConfig(activation=act, weight=weight)


# --------------------------------------------------------------------------- ReLU6 units (QAT and INT8)

class QatConvBnReLU62d(nniqat.ConvBn2d):
    """QAT Conv2d-BN-ReLU6: fake-quantized weights, trainable BN, ReLU6 before the output fake-quant."""

    _FLOAT_MODULE = ConvBnReLU62d
    _FLOAT_RELU_MODULE = nn.ReLU6
    _FUSED_FLOAT_MODULE = ConvReLU62d

    def forward(self, input):
        return F.relu6(self._forward(input))


class QatConvReLU62d(nniqat.ConvReLU2d):
    """QAT Conv2d-ReLU6 (no BN)."""

    _FLOAT_MODULE = ConvReLU62d
    _FLOAT_RELU_MODULE = nn.ReLU6

    def forward(self, input):
        return F.relu6(self._conv_forward(input, self.weight_fake_quant(self.weight), self.bias))


def relu6_any_layout(x: torch.Tensor) -> torch.Tensor:
    """Quantized ReLU6 that is right for channels-last inputs on every engine.

    On this build the qnnpack clamp kernel behind quantized relu6/hardtanh/clamp writes NHWC data into an
    output it allocates NCHW-strided, so a ReLU6 after a qnnpack conv (whose outputs are channels-last)
    scrambles the tensor (pytorch#46077 fixed the same bug for the other qnnpack activations). An elementwise
    clamp does not care about layout: run it on the NHWC buffer viewed as a contiguous (N, H, W, C) tensor.
    """
    if x.dim() != 4:
        return torch.ops.quantized.relu6(x, False)
    nhwc = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return torch.ops.quantized.relu6(nhwc, False).permute(0, 3, 1, 2)


class QuantizedReLU6(nnq.ReLU6):
    """ReLU6 not fused: ReLU6 on its input's grid (as torch.ao.nn.quantized.ReLU6), right on every layout."""

    def forward(self, input):
        return relu6_any_layout(input)

    def _get_name(self):
        return "QuantizedReLU6"

    @staticmethod
    def from_float(mod, use_precomputed_fake_quant=False):
        return QuantizedReLU6()


# the output grid's top may pass 6 by float rounding of scale = max / 255
_SIX = 6.0 + 1e-4


class QuantizedConvReLU62d(nnq.Conv2d):
    """INT8 Conv2d-ReLU6 (ReLU6 fused): the conv (with its ReLU) requantizes onto the grid observed after
    ReLU6, [0, m] with m <= 6, so the requantization is the clamp at 6. A unit whose grid reaches past 6
    (7-bit ``reduce_range`` grids on x86) becomes :class:`QuantizedConvReLU62dWide`, which clamps explicitly."""

    _FLOAT_MODULE = ConvReLU62d
    _NNIQAT_CONV_BN_MODULE = QatConvBnReLU62d
    _NNI_CONV_RELU_MODULE = ConvReLU62d

    def forward(self, input):
        if len(input.shape) != 4:
            raise ValueError("Input shape must be `(N, C, H, W)`!")
        return torch.ops.quantized.conv2d_relu(input, self._packed_params, self.scale, self.zero_point)

    def _get_name(self):
        return "QuantizedConvReLU62d"

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant=False):
        from ...compat import quantized_conv_base

        conv = mod if hasattr(mod, "weight_fake_quant") else mod[0]
        if conv.padding_mode != "zeros":
            raise QuantizationError(f"conv padding_mode '{conv.padding_mode}' is not supported in a fused "
                                    f"conv-ReLU6 unit; use padding_mode='zeros'")
        scale, zero_point = mod.activation_post_process.calculate_qparams()
        top = float(scale.reshape(-1)[0]) * (255 - int(zero_point.reshape(-1)[0]))
        target = QuantizedConvReLU62d if top <= _SIX else QuantizedConvReLU62dWide
        return quantized_conv_base().from_float(target, mod, use_precomputed_fake_quant=use_precomputed_fake_quant)


class QuantizedConvReLU62dWide(QuantizedConvReLU62d):
    """INT8 Conv2d-ReLU6 whose output grid reaches past 6: an explicit quantized ReLU6 follows the conv."""

    def forward(self, input):
        if len(input.shape) != 4:
            raise ValueError("Input shape must be `(N, C, H, W)`!")
        out = torch.ops.quantized.conv2d_relu(input, self._packed_params, self.scale, self.zero_point)
        return relu6_any_layout(out)

    def _get_name(self):
        return "QuantizedConvReLU62dWide"


def static_mappings() -> dict:
    return {**tq.get_default_static_quant_module_mappings(), nn.ReLU6: QuantizedReLU6, ConvReLU62d: QuantizedConvReLU62d,
            QatConvBnReLU62d: QuantizedConvReLU62d, QatConvReLU62d: QuantizedConvReLU62d}


def qat_mappings() -> dict:
    return {**tq.get_default_qat_module_mappings(), ConvBnReLU62d: QatConvBnReLU62d, ConvReLU62d: QatConvReLU62d}


def _allow_list() -> set:
    # ReLU6 outside a fused unit keeps its input's qparams when quantized (torch.ao.nn.quantized.ReLU6): an
    # observer after it would be measured and never used, and in QAT it would fake-quantize what INT8 does not.
    return tq.get_default_qconfig_propagation_list() - {nn.ReLU6}


# --------------------------------------------------------------------------- stages

def engine_of(model: nn.Module) -> str:
    """The engine a prepared/converted model was made for (recorded by :func:`prepare`)."""
    engine = getattr(model, "mbquant_engine", None)
    if not isinstance(engine, str):
        raise QuantizationError(f"{type(model).__name__} was not prepared by mbquant.mobile.torchscript.engine.prepare (no engine "
                                f"recorded); pass engine= explicitly or prepare it with mbquant")
    return engine


def prepare(model: nn.Module, config: QuantConfig, engine: str, *, qat: bool = False) -> nn.Module:
    """Fuse a copy of ``model``, wrap it in QuantStub/DeQuantStub, attach the qconfig and insert observers
    (PTQ, eval mode) or fake-quants (``qat``, train mode). ``model`` itself is untouched."""
    qc = qconfig(engine, config, qat=qat)
    wrapped = tq.QuantWrapper(fuse(model, is_qat=qat, fuse_relu6=bool(config.fuse_relu6))).train(qat)
    wrapped.qconfig = qc
    with quantized_engine(engine), _legacy_api():
        if qat:
            tq.propagate_qconfig_(wrapped)
            tq.convert(wrapped, mapping=qat_mappings(), inplace=True, remove_qconfig=False)
            tq.prepare(wrapped, inplace=True, allow_list=_allow_list(),
                       observer_non_leaf_module_list=set(qat_mappings().values()))
        else:
            tq.prepare(wrapped, inplace=True, allow_list=_allow_list())
    wrapped.mbquant_engine = engine
    return wrapped


def convert(prepared: nn.Module) -> nn.Module:
    """The INT8 eager model (eval mode) of a calibrated or QAT-trained ``prepared`` model (left untouched)."""
    engine = engine_of(prepared)
    model = copy.deepcopy(prepared).eval()
    with quantized_engine(engine), _legacy_api():
        qmodel = tq.convert(model, mapping=static_mappings(), inplace=True)
    floats = [n for n, m in qmodel.named_modules() if type(m) in (nn.Conv2d, nn.Linear) or isinstance(m, nn.BatchNorm2d)]
    if floats:
        raise QuantizationError(f"{len(floats)} conv/linear/BN modules stayed in float after eager convert "
                                f"(first: '{floats[0]}'); their qconfig or fusion is missing")
    return qmodel


@dataclass(frozen=True)
class WeightGranularity:
    """What the INT8 model's weights really are (read from the quantized weights, not from the config)."""

    granularity: str          # "per-channel", "per-tensor", "mixed" or "none"
    per_channel_layers: int
    per_tensor_layers: int

    def to_dict(self) -> dict:
        return {"granularity": self.granularity, "per_channel_layers": self.per_channel_layers,
                "per_tensor_layers": self.per_tensor_layers}


def weight_granularity(qmodel: nn.Module) -> WeightGranularity:
    from ...compat import quantized_conv_base

    schemes = [m.weight().qscheme() for m in qmodel.modules() if isinstance(m, (quantized_conv_base(), nnq.Linear))]
    pc = sum(s in (torch.per_channel_affine, torch.per_channel_symmetric) for s in schemes)
    pt = len(schemes) - pc
    kind = "none" if not schemes else "per-channel" if pt == 0 else "per-tensor" if pc == 0 else "mixed"
    return WeightGranularity(kind, pc, pt)


# --------------------------------------------------------------------------- QAT adapter

class EagerQat(QatModel):
    """Eager QAT for the TorchScript backends, driven like the PT2E :class:`~mbquant.quant.qat.QatGraph`:
    ``module`` trains; ``set_mode``, ``freeze_bn``, ``freeze_observers``, ``enable_fake_quant``,
    ``init_ranges`` (from :class:`QatModel`) steer it; ``convert()`` gives the eager INT8 model."""

    def __init__(self, model: nn.Module, config: QuantConfig, engine: str):
        self.engine = engine
        self.module = prepare(model, config, engine, qat=True)

    def set_mode(self, train: bool) -> None:
        """Train/eval mode; after :meth:`freeze_bn` the fused QAT conv-BN modules keep BN in eval mode."""
        self.module.train(train)

    def _freeze_bn(self) -> None:
        """Stop updating BN running statistics (torch's freeze_bn_stats matches its own classes by exact type,
        so the ReLU6 units are frozen directly)."""
        from ...compat import qat_conv_bn_base

        self.module.apply(nniqat.freeze_bn_stats)
        for m in self.module.modules():
            if isinstance(m, qat_conv_bn_base()) and not m.freeze_bn:
                m.freeze_bn_stats()

    def convert(self) -> nn.Module:
        """The INT8 eager model (eval mode); the trainable module is left as it is."""
        return convert(self.module)
