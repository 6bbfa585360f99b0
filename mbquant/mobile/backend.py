"""The protocol every backend provides, the predictors they load, and the artifact file name (built here only).

A backend turns a float model into INT8 for one runtime and writes/loads that runtime's artifact:

    prepare(float_model, config) -> observed model      calibrated by mbquant.calibrate.run (to_eval, session)
    prepare_qat(float_model, config) -> QatModel         trained by mbquant.finetune
    convert(prepared) -> INT8 model                      the in-process reference (``reference``)
    write(model, stem, resolution=) -> [Written]  lower/serialise, atomically; never quantizes or evaluates
    load(path) -> Predictor                              the artifact run by its real runtime

The pipeline (:mod:`mbquant.pipeline`) chains these for every backend of a run and measures the results.
"""
from __future__ import annotations

import abc
import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch
from torch import nn

from .table import BackendSpec

if TYPE_CHECKING:
    from ..config import QuantConfig, RunConfig
    from ..models import ModelInfo
    from ..quant.export import FloatModel
    from ..quant.qat import QatModel


def artifact_name(info: "ModelInfo", precision: str, suffix: str) -> str:
    """``<model>_w<width>_r<resolution>_<precision><suffix>``, e.g. ``mobilenet_v2_w0.5_r64_int8.pte``."""
    return f"{info.name}_w{info.width_mult:g}_r{info.resolution}_{precision}{suffix}"


@dataclass
class Written:
    """One file a backend wrote, with what the backend knows about it (delegation, lowering time, ...)."""

    path: Path
    details: dict[str, Any] = field(default_factory=dict)
    delegated: float | None = None     # share of ops inside the delegate (backends with one)

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


def times_ms(fn, x: torch.Tensor, runs: int) -> list[float]:
    """Wall time of each of ``runs`` calls ``fn(x)``, in milliseconds."""
    out = []
    with torch.no_grad():
        for _ in range(runs):
            t = time.perf_counter()
            fn(x)
            out.append((time.perf_counter() - t) * 1000)
    return out


def latency_summary(times: list[float]) -> dict:
    """Median / p90 (ms) of measured call times."""
    times = sorted(times)
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3),
            "runs": len(times)}


def latency_ms(fn, x: torch.Tensor, *, warmup: int = 3, runs: int = 20) -> dict:
    """Median / p90 wall time of ``fn(x)`` in milliseconds."""
    times_ms(fn, x, warmup)
    return {**latency_summary(times_ms(fn, x, runs)), "batch": int(x.shape[0])}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block; the previous count is restored after (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Predictor(abc.ABC):
    """Logits of a batch of preprocessed images, from an artifact or an in-process model."""

    runtime: str = ""

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N x classes, float) of ``x`` (N x 3 x H x W)."""

    def latency(self, x: torch.Tensor, runs: int, threads: int) -> dict | None:
        """Host latency (None where the host cannot time the real runtime, e.g. an MCU program)."""
        with torch_threads(threads):
            return latency_ms(self, x, runs=runs)

    def close(self) -> None:
        return None


class ModulePredictor(Predictor):
    """An in-process model (float graph or INT8 reference); ``context`` wraps every call (e.g. a quantized engine)."""

    def __init__(self, module: nn.Module, runtime: str, context=contextlib.nullcontext):
        self.module, self.runtime, self._context = module, runtime, context

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self._context(), torch.no_grad():
            return self.module(x).float()


class Backend(abc.ABC):
    """One runtime's quantize/write/load steps (see the module doc); ``spec`` is its row in the table."""

    def __init__(self, spec: BackendSpec, run: "RunConfig"):
        self.spec, self.run = spec, run

    @property
    def name(self) -> str:
        return self.spec.name

    @abc.abstractmethod
    def prepare(self, fm: "FloatModel", config: "QuantConfig") -> nn.Module:
        """The observed model calibration feeds (``config`` resolved for this backend)."""

    @abc.abstractmethod
    def prepare_qat(self, fm: "FloatModel", config: "QuantConfig") -> "QatModel":
        """The fake-quantized model QAT trains."""

    @abc.abstractmethod
    def convert(self, prepared: nn.Module) -> nn.Module:
        """The INT8 model (BN folded, checked) from a calibrated or trained prepared model."""

    @abc.abstractmethod
    def write(self, model: nn.Module, stem: Path, *, resolution: int) -> list[Written]:
        """Write ``model``'s artifacts as ``stem`` + each suffix of the row, atomically (inputs are
        ``resolution`` x ``resolution``)."""

    @abc.abstractmethod
    def load(self, path: Path) -> Predictor:
        """The written artifact run by its real runtime."""

    def session(self) -> ContextManager:
        """Context every stage of this backend runs in (e.g. the legacy quantized engine)."""
        return contextlib.nullcontext()

    def to_eval(self, prepared: nn.Module) -> None:
        """Eval mode for calibration (an exported graph ignores ``.eval()``)."""
        from torchao.quantization.pt2e import move_exported_model_to_eval

        move_exported_model_to_eval(prepared)

    def reference(self, int8: nn.Module) -> Predictor:
        """The in-process INT8 model the artifact is checked against."""
        return ModulePredictor(int8, f"in-process INT8 model ({self.name})", self.session)

    def describe(self, int8: nn.Module, config: "QuantConfig") -> dict[str, Any]:
        """Structure facts of the INT8 model for the report (BN left, fused units, float layers, ...)."""
        return {}

    def float_layers(self, int8: nn.Module) -> list[str]:
        """Layers of the INT8 model that run in float (must be exactly those the config keeps in float)."""
        return []

    def diagnose(self, fm: "FloatModel", int8: nn.Module, x: torch.Tensor) -> dict[str, Any]:
        """Numerical diagnostics for the report (e.g. per-layer SQNR against the float model)."""
        return {}

    def companions(self, artifact: Path, info: "ModelInfo", details: dict[str, Any]) -> list[Path]:
        """Files that travel with a verified artifact (e.g. a firmware header); written beside it."""
        return []
