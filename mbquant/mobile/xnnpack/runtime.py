"""Run a written ``.pte`` with the real ExecuTorch runtime (the same C++ runtime and XNNPACK kernels a phone uses)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from ...errors import VerificationError
from ..backend import Predictor, latency_ms


@contextlib.contextmanager
def runtime_threads(n: int) -> Iterator[None]:
    """Threads of the ExecuTorch threadpool (global in the runtime) inside the block; restored after."""
    from executorch.extension.pybindings import portable_lib

    before = portable_lib._threadpool_get_thread_count()
    portable_lib._unsafe_reset_threadpool(int(n))
    try:
        yield
    finally:
        portable_lib._unsafe_reset_threadpool(int(before))


class PteModel(Predictor):
    """A loaded ExecuTorch program's ``forward``. Keeps the program bytes and the method alive together."""

    runtime = "ExecuTorch runtime (executorch.runtime), XNNPACK delegate"

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
        """Run ``x`` in chunks of the program's fixed batch size (each execute gets its own input copy)."""
        if x.shape[0] % self.batch:
            raise VerificationError(f"batch of {x.shape[0]} images does not split into the program's batch {self.batch}")
        return torch.cat([self._method.execute([c.contiguous().clone()])[0] for c in x.split(self.batch)]).float()

    def latency(self, x: torch.Tensor, runs: int, threads: int) -> dict:
        with runtime_threads(threads):
            return latency_ms(self, x, runs=runs)
