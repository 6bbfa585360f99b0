"""The Cortex-M backend's quantizer: ExecuTorch's ``CortexMQuantizer`` for PTQ, and the same quantizer with
fake-quantize specs for QAT (ExecuTorch ships no QAT configuration for it).

The QAT specs keep the Cortex-M numerics of the PTQ configuration, spec for spec: symmetric per-channel INT8 conv
weights, symmetric per-tensor INT8 linear weights, per-tensor affine INT8 activations (each with the int8 range
the PTQ observer uses), INT32 biases derived from the input and weight scales, ReLU/ReLU6 folded into the output
range by the quantizer's own patterns. Only the observers change: fused moving-average fake-quantize, so training
sees the rounding the kernels will do. The patterns (what is quantized where) are the PTQ quantizer's, so the
converted graph lowers to the same ``cortex_m::`` kernels.
"""
from __future__ import annotations

import torch


def build_quantizer(*, qat: bool):
    from executorch.backends.cortex_m.quantizer.quantizer import CortexMQuantizer

    if not qat:
        return CortexMQuantizer()
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
    return quantizer


def _qat_config(*, per_channel: bool):
    """(input activation, output activation, weight) fake-quantize specs for QAT, Cortex-M numerics."""
    from torchao.quantization.pt2e import (FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver,
                                           MovingAveragePerChannelMinMaxObserver)
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    act = QuantizationSpec(dtype=torch.int8, qscheme=torch.per_tensor_affine,
                           observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
                               observer=MovingAverageMinMaxObserver))
    if per_channel:
        weight = QuantizationSpec(dtype=torch.int8, qscheme=torch.per_channel_symmetric, ch_axis=0,
                                  observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
                                      observer=MovingAveragePerChannelMinMaxObserver))
    else:
        weight = QuantizationSpec(dtype=torch.int8, qscheme=torch.per_tensor_symmetric,
                                  observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
                                      observer=MovingAverageMinMaxObserver))
    return act, act, weight
