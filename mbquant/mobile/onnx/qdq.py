"""The ONNX backend: the XNNPACK-style symmetric INT8 configuration (the same composed quantizer as the phone's
``.pte``: ReLU6 fused, percentile ranges, fp32 logits when the recipe says so), exported with ``torch.onnx.export``
(dynamo) from the converted PT2E graph, and run by ONNX Runtime's CPU provider.

The exported graph keeps the quantization explicit (QDQ): ONNX Runtime fuses each DequantizeLinear -> op ->
QuantizeLinear into its INT8 kernels (QLinearConv, ...), so its rounding differs from the PT2E reference's float
arithmetic on images whose top-2 logits are within a few INT8 steps, as XNNPACK's does.
"""
from __future__ import annotations

import collections
import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...atomic import atomic_path
from ...config import QuantConfig
from ...errors import ExportError, VerificationError
from ...quant.export import FloatModel
from ...quant.keep_float import resolve_names
from ...timing import latency_ms
from ..backend import Predictor, Written
from ..pt2e import PT2EBackend

OPSET = 21            # QuantizeLinear/DequantizeLinear with per-axis int8 and int32 bias (opset >= 13), as ORT 1.32 runs
MAX_BATCH = 1024


def export_onnx(model: nn.Module, resolution: int, path: Path) -> dict[str, Any]:
    """Write ``model`` (a converted PT2E graph or a float module) as an ONNX model with a dynamic batch, checked by
    ``onnx.checker``, atomically; returns what the file holds (opset, op counts)."""
    import onnx

    x = torch.zeros(2, 3, resolution, resolution)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        with contextlib.redirect_stdout(None):      # the exporter prints its progress
            program = torch.onnx.export(ep, (x,), dynamo=True, opset_version=OPSET, input_names=["image"],
                                        output_names=["logits"], verbose=False)
    except Exception as exc:
        raise ExportError(f"exporting to ONNX failed: {type(exc).__name__}: {str(exc)[:400]}") from exc
    with atomic_path(path) as tmp:
        program.save(str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:
            raise ExportError(f"the exported ONNX model fails onnx.checker: {str(exc)[:400]}") from exc
    proto = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "ops": dict(sorted(ops.items())), "onnx": onnx.__version__}


class OrtModel(Predictor):
    """An ONNX model run by ONNX Runtime's CPU provider from the file alone (``threads`` intra-op threads)."""

    def __init__(self, path: Path, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise VerificationError(f"model '{self.path}' does not exist; write it before opening it")
        self._session = self._open(threads)
        import onnxruntime as ort

        self.runtime = f"ONNX Runtime {ort.__version__} (CPU provider)"
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise VerificationError(f"'{self.path}' takes {[i.shape for i in inputs]}, not one image batch "
                                    f"(N x 3 x H x W); it is not a model mbquant wrote")
        self._input = inputs[0].name

    def _open(self, threads: int | None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
        try:
            return ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise VerificationError(f"ONNX Runtime could not load '{self.path}': {str(exc)[:300]}") from exc

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self._session.run(None, {self._input: x.contiguous().numpy()})[0]
        return torch.from_numpy(out).float()

    def latency(self, x: torch.Tensor, runs: int, threads: int) -> dict:
        """Timed on a session of its own with ``threads`` intra-op threads (ORT fixes them when it loads)."""
        timed = OrtModel(self.path, threads)
        return latency_ms(timed, x, runs=runs, batch=int(x.shape[0]))


class OnnxBackend(PT2EBackend):
    def quantizer(self, fm: FloatModel, config: QuantConfig, *, qat: bool):
        from ..xnnpack.quantizer import build_quantizer

        return build_quantizer(config, resolve_names(config.keep_float or (), fm.module, fm.graph), qat=qat)

    def write(self, model: nn.Module, stem: Path, *, resolution: int) -> list[Written]:
        path = Path(f"{stem}.onnx")
        t = time.perf_counter()
        facts = export_onnx(model, resolution, path)
        import onnxruntime as ort

        details = {"export_seconds": round(time.perf_counter() - t, 1), **facts, "onnxruntime": ort.__version__}
        return [Written(path, details)]

    def open(self, path: Path, sidecar) -> Predictor:
        return OrtModel(Path(path))

    def summary_lines(self, result) -> list[str]:
        ops = result.details.get("ops", {})
        q, dq = ops.get("QuantizeLinear", 0), ops.get("DequantizeLinear", 0)
        main = ", ".join(f"{ops[k]} {k}" for k in ("Conv", "Gemm", "MatMul", "Clip", "Add", "Mul", "HardSwish",
                                                    "HardSigmoid") if ops.get(k))
        return [f"{result.file}: ONNX opset {result.details.get('opset')}, QDQ graph ({q} QuantizeLinear, {dq} "
                f"DequantizeLinear; {main}), run by {result.runtime}"]
