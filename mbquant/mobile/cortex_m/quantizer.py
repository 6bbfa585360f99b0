"""The Cortex-M backend's quantizer: ExecuTorch's ``CortexMQuantizer`` for PTQ, and the same quantizer with
fake-quantize specs for QAT (ExecuTorch ships no QAT configuration for it).

The QAT specs keep the Cortex-M numerics of the PTQ configuration, spec for spec: symmetric per-channel INT8 conv
weights, symmetric per-tensor INT8 linear weights, per-tensor affine INT8 activations (each with the int8 range
the PTQ observer uses), INT32 biases derived from the input and weight scales, ReLU/ReLU6 folded into the output
range by the quantizer's own patterns. Only the observers change: moving-average fake-quantizes (mbquant's
``qat_activation``/``qat_weight``: convert writes the weight steps they trained with, and the activation steps to
a float32 rounding), so training sees the rounding the kernels will do. The patterns (what is quantized where) are
the PTQ quantizer's, so the converted graph lowers to the same ``cortex_m::`` kernels.
"""
from __future__ import annotations

import torch


def build_quantizer(*, qat: bool):
    from executorch.backends.cortex_m.quantizer.quantizer import CortexMQuantizer

    if not qat:
        return _per_image_checks(CortexMQuantizer())
    from executorch.backends.cortex_m.quantizer.quantization_configs import INT8_PER_CHANNEL_CONFIG as PTQ_CONV
    from executorch.backends.cortex_m.quantizer.quantization_configs import INT8_PER_TENSOR_CONFIG as PTQ_OTHER
    from executorch.backends.cortex_m.quantizer.quantization_configs import CortexMQuantizationConfig

    conv_config, other_config = _qat_config(per_channel=True), _qat_config(per_channel=False)
    # the INT32 bias specs are the PTQ configs' own (derived from the input and weight scales, as CMSIS-NN adds them)
    quantizer = CortexMQuantizer(CortexMQuantizationConfig(*other_config, PTQ_OTHER.bias, "mbquant.qat.int8"))
    conv = quantizer.quantizers[0]               # the per-channel conv PatternQuantizer (see CortexMQuantizer)
    if getattr(conv, "quantization_config", None) is not PTQ_CONV:
        from ...errors import QuantizationError

        raise QuantizationError("CortexMQuantizer's first part is not its per-channel conv quantizer any more (the "
                                "installed ExecuTorch differs from the pinned 1.5.1); QAT for pte-cortex-m cannot "
                                "be configured: use `mbquant ptq --target mcu`")
    conv.quantization_config = CortexMQuantizationConfig(*conv_config, PTQ_CONV.bias, "mbquant.qat.int8_per_channel")
    return _per_image_checks(quantizer)


def _one_image(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``t``'s shape with a symbolic batch dimension taken as one image, in ``t``'s memory format
    (a tensor without one, e.g. a constant, keeps its shape)."""
    shape = [1 if i == 0 and isinstance(s, torch.SymInt) else int(s) for i, s in enumerate(t.shape)]
    nhwc = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    one = torch.empty(shape, device="meta")
    return one.contiguous(memory_format=torch.channels_last) if nhwc else one


def _per_image_checks(quantizer):
    """The quantizer with ExecuTorch's add/mul pattern check judged on one image.

    mbquant exports the graph it quantizes with a dynamic batch (calibration and evaluation run batched) and
    lowers at batch 1. ``CortexMAddMulCheck`` accepts a channel broadcast (the squeeze-excitation gate
    ``[N, C, 1, 1] * [N, C, H, W]``) only when the gate holds C elements, which a symbolic N never proves: every SE
    multiply of MobileNetV3 was left in float, a float island in the Cortex-M program. The same check on one image
    accepts it, as it does for ExecuTorch's own batch-1 flow, and the lowered multiply is ``quantized_mul``."""
    from executorch.backends.cortex_m.passes.passes_utils import (is_channel_broadcast, is_channels_last,
                                                                  is_foldable_alpha)
    from executorch.backends.cortex_m.quantizer.pattern_checkers import CortexMAddMulCheck
    from executorch.backends.cortex_m.quantizer.pattern_matcher import PatternMatcher

    class PerImageAddMulCheck(CortexMAddMulCheck):
        @classmethod
        def check_pattern(cls, pattern):
            for node in pattern:
                if not is_foldable_alpha(node.kwargs.get("alpha", 1)):
                    return False
                if len(node.all_input_nodes) == 2:
                    vals = [n.meta.get("val") for n in node.all_input_nodes]
                    if not all(isinstance(v, torch.Tensor) for v in vals):
                        return super().check_pattern(pattern)       # ExecuTorch's own check, as it reads them
                    t1, t2 = (_one_image(v) for v in vals)
                    if t1.shape != t2.shape and not (is_channel_broadcast(t1, t2) and is_channels_last(t1)):
                        return False
            return True

    for part in quantizer.quantizers:
        matcher = getattr(part, "pattern_matcher", None)
        if matcher is None:
            continue
        support = {k: PerImageAddMulCheck if v is CortexMAddMulCheck else v for k, v in matcher.support_dict.items()}
        part.pattern_matcher = PatternMatcher(support, support_dict_name=matcher.support_dict_name)
    return quantizer


def _qat_config(*, per_channel: bool):
    """(input activation, output activation, weight) fake-quantize specs for QAT, Cortex-M numerics."""
    from torchao.quantization.pt2e import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    from ...calibrate.observers import qat_activation, qat_weight

    act = QuantizationSpec(dtype=torch.int8, qscheme=torch.per_tensor_affine,
                           observer_or_fake_quant_ctr=qat_activation(MovingAverageMinMaxObserver))
    if per_channel:
        weight = QuantizationSpec(dtype=torch.int8, qscheme=torch.per_channel_symmetric, ch_axis=0,
                                  observer_or_fake_quant_ctr=qat_weight(MovingAveragePerChannelMinMaxObserver))
    else:
        weight = QuantizationSpec(dtype=torch.int8, qscheme=torch.per_tensor_symmetric,
                                  observer_or_fake_quant_ctr=qat_weight(MovingAverageMinMaxObserver))
    return act, act, weight
