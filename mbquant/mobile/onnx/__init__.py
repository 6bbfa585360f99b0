"""``onnx-qdq``: PT2E INT8 -> an ONNX model in QDQ form (QuantizeLinear/DequantizeLinear around Conv, Gemm, Add;
``Clip`` for ReLU6; BatchNorm folded), run by ONNX Runtime (``--format onnx``; phones through ONNX Runtime Mobile,
NNAPI/QNN execution providers or converters to TFLite, and x86 servers).

qdq.py (the Backend: quantizer, writer, runtime). Needs the optional extra ``mbquant[onnx]`` (onnx, onnxscript,
onnxruntime); this module imports nothing heavy, so asking for the format without the extra fails before any work.
"""
from __future__ import annotations


def backend(spec, options):
    """The row's backend object (the table calls this)."""
    from .qdq import OnnxBackend

    return OnnxBackend(spec, options)
