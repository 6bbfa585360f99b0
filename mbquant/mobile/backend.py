"""The protocol every backend provides and the predictors it returns.

A backend turns a float model into INT8 for one runtime and writes that runtime's artifact; it is the only place
that knows about that runtime:

    prepare(float_model, config) -> observed model      calibrated by mbquant.calibrate.run (to_eval, session)
    prepare_qat(float_model, config) -> QatModel         trained by mbquant.finetune
    convert(prepared) -> INT8 model                      the in-process reference (``reference``)
    write(model, stem, resolution=) -> [Written]         lower/serialise, atomically; never quantizes or evaluates
    open(path, sidecar) -> Predictor                     the artifact FROM ITS FILE, run by its real runtime;
                                                         stateless: the same call opens it in a run, in
                                                         ``mbquant check`` and in a bundle
    gate_failures(result, run) -> [str]                  its own quality gates (delegation, memory budgets, ...)
    summary_lines(result) -> [str]                       lines under the run's table (kept in the report)

Options the backend's row declares arrive resolved in ``self.options``. The pipeline (:mod:`mbquant.pipeline`)
chains these for every backend of a run and measures the results.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Mapping

import torch
from torch import nn

from ..timing import latency_ms
from .spec import BackendSpec

if TYPE_CHECKING:
    from ..config import QuantConfig, RunConfig
    from ..models.info import ModelInfo
    from ..quant.export import FloatModel
    from ..quant.qat import QatModel
    from ..records import ArtifactResult, Sidecar


@dataclass
class Written:
    """One file a backend wrote, with what the backend knows about it (delegation, lowering time, ...).
    ``details`` travel in the sidecar (the backend's ``open`` reads them back); ``details["notes"]`` are
    informational lines and ``details["warnings"]`` lines the user should act on."""

    path: Path
    details: dict[str, Any] = field(default_factory=dict)
    delegated: float | None = None     # share of ops inside the delegate (backends with one)

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


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
        with torch_threads(threads), torch.no_grad():
            return latency_ms(self, x, runs=runs, batch=int(x.shape[0]))

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
    """One runtime's steps (see the module doc); ``spec`` is its row, ``options`` its resolved options."""

    def __init__(self, spec: BackendSpec, options: Mapping[str, Any] | None = None):
        self.spec, self.options = spec, dict(options or {})

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
    def open(self, path: Path, sidecar: "Sidecar") -> Predictor:
        """The artifact at ``path`` run by its real runtime, from the file alone (``sidecar`` says how it was
        written); a file that is not this backend's artifact raises a VerificationError naming the problem."""

    def session(self) -> ContextManager:
        """Context every stage of this backend runs in (e.g. the legacy quantized engine)."""
        return contextlib.nullcontext()

    def to_eval(self, prepared: nn.Module) -> None:
        """Eval mode for calibration (an exported graph ignores ``.eval()``)."""
        from torchao.quantization.pt2e import move_exported_model_to_eval

        move_exported_model_to_eval(prepared)        # calibrate.run calls it with torchao's patterns memoised

    def reference(self, int8: nn.Module) -> Predictor:
        """The in-process INT8 model the artifact is checked against (a converted graph runs with
        :mod:`mbquant.quant.fast_qdq`'s quantize/dequantize: the same numbers, fewer memory passes)."""
        from ..quant.fast_qdq import with_fast_qdq

        return ModulePredictor(with_fast_qdq(int8), f"in-process INT8 model ({self.name})", self.session)

    def describe(self, int8: nn.Module, config: "QuantConfig") -> dict[str, Any]:
        """Structure facts of the INT8 model for the report (BN left, fused units, float layers, ...)."""
        return {}

    def float_layers(self, int8: nn.Module) -> list[str]:
        """Layers of the INT8 model that run in float (must be exactly those the config keeps in float)."""
        return []

    def diagnose(self, fm: "FloatModel", int8: nn.Module, x: torch.Tensor) -> dict[str, Any]:
        """Numerical diagnostics for the report (e.g. per-layer SQNR against the float model)."""
        return {}

    def gate_failures(self, result: "ArtifactResult", run: "RunConfig") -> list[str]:
        """This backend's own quality gates on a measured artifact (messages name the value, the bound, the fix)."""
        return []

    def summary_lines(self, result: "ArtifactResult") -> list[str]:
        """Lines printed under the run's table for this artifact (stored in the report)."""
        return []

    def companions(self, artifact: Path, info: "ModelInfo", details: dict[str, Any]) -> list[Path]:
        """Files that travel with a verified artifact (e.g. a firmware header); written beside it."""
        return []

    def verify_on_arm(self, bundle: Any, data: Path, limit: int | None) -> dict[str, Any]:
        """Run a bundle's program on aarch64 and on this host, image by image (backends with an ARM runner)."""
        from ..errors import ConfigError

        raise ConfigError(f"backend '{self.name}' has no ARM runner; `mbquant verify-arm` runs bundles whose program "
                          f"an ARM runner can load")
