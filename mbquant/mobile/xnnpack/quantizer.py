"""The XNNPACK backend's quantizer, composed (``ComposableQuantizer``) rather than subclassed:

    KeepFloat(layers)            claims the ops of the layers kept in fp32 first (NNCF's ignored scope)
    Relu6Fusion (fuse_relu6)     conv(-BN)-ReLU6 as one unit, quantized after the clamp
    XNNPACKQuantizer             ExecuTorch's stock annotation for everything else (filtered off the kept layers)
"""
from __future__ import annotations

from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
from torchao.quantization.pt2e.quantizer import ComposableQuantizer

from ...calibrate.observers import quantization_config
from ...config import QuantConfig
from ...quant.keep_float import KeepFloat
from ...quant.relu6 import Relu6Fusion


def build_quantizer(config: QuantConfig, layers: tuple[str, ...] = (), *, qat: bool = False) -> ComposableQuantizer:
    """The quantizer for a resolved ``config``; ``layers`` are the (resolved) module names kept in fp32."""
    qconfig = quantization_config(config, qat=qat)
    keep = KeepFloat(layers, qconfig)
    parts = [keep]
    if config.fuse_relu6:
        parts.append(Relu6Fusion(qconfig, keep.quantizable))
    parts.append(XNNPACKQuantizer().set_global(qconfig).set_filter_function(keep.quantizable))
    return ComposableQuantizer(parts)
