"""A written .pt/.ptl loaded in a fresh Python process (``torch.jit.load`` or the lite interpreter), used as a
predictor: batches go to the worker over a pipe and logits come back, so the artifact is checked as an app
loads it, not as the process that wrote it.

Quantized weights are re-packed for the quantized engine that is current when a file is loaded, so the worker
sets the artifact's engine before loading it (loaded under x86, a qnnpack file computes different logits).
"""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ...errors import VerificationError
from ..backend import Predictor

_WORKER = r"""
import io, os, struct, sys
proto = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)                      # anything else printed goes to stderr, never into the protocol
import torch
from mbquant.compat import load_for_lite_interpreter
from mbquant.timing import latency_ms
path, engine, lite, threads = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
torch.set_num_threads(threads)
torch.backends.quantized.engine = engine
try:
    module = load_for_lite_interpreter(path) if lite else torch.jit.load(path, map_location="cpu").eval()
except Exception as exc:
    print("LOAD-FAILED " + type(exc).__name__ + ": " + " ".join(str(exc).split())[:300], file=sys.stderr)
    sys.exit(3)
inp = sys.stdin.buffer

def send(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    proto.write(struct.pack("<Q", len(data)) + data)
    proto.flush()

send({"ready": True})
while True:
    head = inp.read(8)
    if len(head) < 8:
        break
    msg = torch.load(io.BytesIO(inp.read(struct.unpack("<Q", head)[0])), weights_only=True)
    x = msg["x"]
    with torch.no_grad():
        if msg["op"] == "run":
            send({"y": module(x).float().contiguous()})
            continue
        torch.set_num_threads(int(msg["threads"]))
        send(latency_ms(module, x, runs=int(msg["runs"]), batch=int(x.shape[0])))
        torch.set_num_threads(threads)
"""


class FreshProcessModel(Predictor):
    """The artifact at ``path`` in a fresh Python process (``lite``: the lite interpreter), ``engine`` set there."""

    def __init__(self, path: Path | str, *, engine: str, lite: bool, threads: int = 1):
        self.path, self.engine, self.lite = Path(path), engine, lite
        self.runtime = (f"{'lite interpreter (_load_for_lite_interpreter)' if lite else 'torch.jit.load'} in a fresh "
                        f"process, {engine} engine")
        if not self.path.exists():
            raise VerificationError(f"artifact '{self.path}' does not exist; write it before loading it")
        self._stderr = tempfile.TemporaryFile()
        root = str(Path(__file__).resolve().parents[3])    # the worker imports mbquant from this tree
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(self.path), engine, "1" if lite else "0",
                                       str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, env=env)
        self._receive()

    def _fail(self, what: str) -> VerificationError:
        self._proc.kill()
        self._proc.wait()
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        runtime = "lite interpreter" if self.lite else "torch.jit.load"
        loaded = next((ln[len("LOAD-FAILED "):] for ln in lines if ln.startswith("LOAD-FAILED ")), None)
        if loaded is not None:
            return VerificationError(f"'{self.path}' is not a TorchScript artifact the {runtime} can load (engine "
                                     f"{self.engine}): {loaded}; pass the file mbquant wrote, with its sidecar")
        last = next((ln for ln in reversed(lines) if ln.strip()), "no message")
        return VerificationError(f"'{self.path}' failed in a fresh process ({runtime}, engine {self.engine}, {what}, "
                                 f"exit {self._proc.returncode}): {last.strip()[:300]}")

    def _receive(self) -> dict:
        head = self._proc.stdout.read(8)
        if len(head) < 8:
            raise self._fail("no answer")
        return torch.load(io.BytesIO(self._proc.stdout.read(struct.unpack("<Q", head)[0])), weights_only=True)

    def _ask(self, msg: dict) -> dict:
        buf = io.BytesIO()
        torch.save(msg, buf)
        try:
            self._proc.stdin.write(struct.pack("<Q", buf.getbuffer().nbytes) + buf.getvalue())
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise self._fail("it stopped reading") from None
        return self._receive()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._ask({"op": "run", "x": x.contiguous()})["y"]

    def latency(self, x: torch.Tensor, runs: int, threads: int) -> dict:
        return self._ask({"op": "latency", "x": x.contiguous(), "runs": runs, "threads": threads})

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()
