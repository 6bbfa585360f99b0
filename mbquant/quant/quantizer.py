"""The PT2E quantizer mbquant uses: ExecuTorch's XNNPACKQuantizer, plus conv(-BN)-ReLU6 fusion."""
from __future__ import annotations

from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

from ..calibrate.observers import quantization_config
from ..config import QuantConfig
from .fuse import annotate_conv_relu6


class FusingXNNPACKQuantizer(XNNPACKQuantizer):
    """XNNPACKQuantizer that first annotates conv -> [BN ->] ReLU6 as one unit.

    It must run before the stock conv/conv_bn annotators, which would otherwise claim the conv alone.
    """

    def _annotate_all_patterns(self, model, quantization_config, filter_fn=None, operator_target=None):
        if quantization_config is not None and operator_target is None:
            def combined(n):
                return all(f(n) for f in (self.filter_fn, filter_fn) if f is not None)

            annotate_conv_relu6(model, quantization_config, combined)
        return super()._annotate_all_patterns(model, quantization_config, filter_fn, operator_target)


def build_quantizer(config: QuantConfig) -> XNNPACKQuantizer:
    quantizer = FusingXNNPACKQuantizer() if config.fuse_relu6 else XNNPACKQuantizer()
    return quantizer.set_global(quantization_config(config))
