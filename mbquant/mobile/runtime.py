"""Run a written ``.pte`` with the real ExecuTorch runtime (the same C++ runtime and XNNPACK kernels a phone uses)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import VerificationError


class PteModel:
    """A loaded ExecuTorch program's ``forward``. Keeps the program bytes and the method alive together."""

    def __init__(self, path: Path | str):
        from executorch.runtime import Runtime

        self.path = Path(path)
        if not self.path.exists():
            raise VerificationError(f"program '{self.path}' does not exist; write it before verifying")
        self._data = self.path.read_bytes()
        try:
            self._program = Runtime.get().load_program(self._data)
            self._method = self._program.load_method("forward")
        except Exception as exc:
            raise VerificationError(f"the ExecuTorch runtime could not load '{self.path}': {exc}") from exc
        if self._method is None:
            raise VerificationError(f"'{self.path}' has no 'forward' method")

        self.batch = int(self._method.metadata.input_tensor_meta(0).sizes()[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run ``x`` in chunks of the program's fixed batch size."""
        if x.shape[0] == self.batch:
            return self._method.execute([x.contiguous()])[0]
        if x.shape[0] % self.batch:
            raise VerificationError(f"batch of {x.shape[0]} images does not split into the program's batch {self.batch}")
        return torch.cat([self._method.execute([c.contiguous()])[0] for c in x.split(self.batch)])


def set_runtime_threads(n: int) -> None:
    """Threads of the ExecuTorch XNNPACK threadpool (global in the runtime; set it deliberately)."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(n))


def latency_ms(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, warmup: int = 3, runs: int = 20) -> dict:
    """Median / p90 wall time of ``fn(x)`` in milliseconds."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3),
            "runs": runs, "batch": int(x.shape[0])}
