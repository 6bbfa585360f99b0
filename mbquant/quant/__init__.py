"""Quantization stages: PT2E (``ptq``, ``qat``, ``quantizer``, ``targets``) and the legacy eager engine
(``eager``, only for TorchScript artifacts). ``fuse(model, is_qat=...)`` is the eager fusion; the PT2E
ReLU6 annotation lives in :mod:`mbquant.quant.fuse` too (``annotate_conv_relu6``, ``match_conv_relu6``).

Note: the name ``mbquant.quant.fuse`` is the function; import the module's other names with
``from mbquant.quant.fuse import ...`` (that form resolves the submodule).
"""
from .fuse import fuse

__all__ = ["fuse"]
