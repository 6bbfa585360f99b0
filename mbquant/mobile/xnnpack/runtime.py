"""Run a written ``.pte`` with the real ExecuTorch runtime (the same C++ runtime and XNNPACK kernels a phone uses)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from ...errors import VerificationError
from ...compat import reset_threadpool, threadpool_size
from ...timing import latency_ms
from ..backend import Predictor


_POOL = {"generation": 0}  # bumped whenever the runtime's threadpool is replaced


def _reset_threadpool(n: int) -> None:
    reset_threadpool(n)
    _POOL["generation"] += 1


@contextlib.contextmanager
def runtime_threads(n: int) -> Iterator[None]:
    """Threads of the ExecuTorch threadpool (global in the runtime) inside the block; restored after.

    Resetting the pool destroys the one every loaded XNNPACK method captured when it was loaded (using such a
    method afterwards crashes the process); :class:`PteModel` reloads its method when the pool was replaced."""
    before = threadpool_size()
    if int(n) == before:
        yield
        return
    _reset_threadpool(n)
    try:
        yield
    finally:
        _reset_threadpool(before)


class PteModel(Predictor):
    """A loaded ExecuTorch program's ``forward``. Keeps the program bytes and the method alive together."""

    runtime = "ExecuTorch runtime (executorch.runtime), XNNPACK delegate"

    def __init__(self, path: Path | str):
        from executorch.runtime import Runtime

        self.path = Path(path)
        if not self.path.exists():
            raise VerificationError(f"program '{self.path}' does not exist; write it before verifying")
        self._data = self.path.read_bytes()
        self._runtime = Runtime
        self._load()
        self.batch = int(self._method.metadata.input_tensor_meta(0).sizes()[0])

    def _load(self) -> None:
        """Load the program and its method (again after the threadpool was replaced: see runtime_threads)."""
        self._method = self._program = None
        try:
            self._program = self._runtime.get().load_program(self._data)
            self._method = self._program.load_method("forward")
        except Exception as exc:
            raise VerificationError(f"the ExecuTorch runtime could not load '{self.path}': {exc}") from exc
        if self._method is None:
            raise VerificationError(f"'{self.path}' has no 'forward' method")
        self._generation = _POOL["generation"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run ``x`` in chunks of the program's fixed batch size (each execute gets its own input copy)."""
        if self._generation != _POOL["generation"]:
            self._load()
        if x.shape[0] % self.batch:
            raise VerificationError(f"batch of {x.shape[0]} images does not split into the program's batch {self.batch}")
        return torch.cat([self._method.execute([c.contiguous().clone()])[0] for c in x.split(self.batch)]).float()

    def latency(self, x: torch.Tensor, runs: int, threads: int) -> dict:
        with runtime_threads(threads):
            return latency_ms(self, x, runs=runs, batch=int(x.shape[0]))
