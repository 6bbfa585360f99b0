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


class _FloatLogitsMixin:
    """Run the layer that produces the model's output (the classifier) in fp32 on the dequantized INT8
    features, so its logits are not rounded onto a 256-step grid where near-tied classes collide.

    XNNPACK runs it as an fp32 fully-connected layer inside the same delegate; the report lists it as
    the one op left in float.
    """

    def annotate(self, model):
        model = super().annotate(model)
        for node in model.graph.nodes:
            if node.op == "output":
                for src in node.all_input_nodes:
                    src.meta.pop("quantization_annotation", None)
        return model


class FloatLogitsXNNPACKQuantizer(_FloatLogitsMixin, XNNPACKQuantizer):
    """The stock annotation with an fp32 classifier."""


class FloatLogitsFusingXNNPACKQuantizer(_FloatLogitsMixin, FusingXNNPACKQuantizer):
    """ReLU6 fusion with an fp32 classifier."""


def build_quantizer(config: QuantConfig, *, qat: bool = False) -> XNNPACKQuantizer:
    classes = {(True, True): FloatLogitsFusingXNNPACKQuantizer, (True, False): FusingXNNPACKQuantizer,
               (False, True): FloatLogitsXNNPACKQuantizer, (False, False): XNNPACKQuantizer}
    quantizer = classes[(config.fuse_relu6, config.float_logits)]()
    return quantizer.set_global(quantization_config(config, qat=qat))
