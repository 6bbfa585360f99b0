"""Script an eager INT8 model and write it as .pt (full JIT) and .ptl (lite interpreter), atomically.

``torch.utils.mobile_optimizer.optimize_for_mobile`` needs a PyTorch build with XNNPACK; where it fails
(this build: "XNNPACK is not enabled") the .ptl is the plain scripted model and the backend says so.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ...atomic import atomic_path
from ...compat import save_for_lite_interpreter
from ...errors import ExportError
from . import engine as eager

DEPRECATION_NOTE = ("TorchScript and the lite interpreter are deprecated upstream (PyTorch points to torch.export "
                    "and ExecuTorch); these artifacts are for apps that still load .pt/.ptl: move such apps to the "
                    ".pte (--format pte) when you can")


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    """torch.jit.script and the lite interpreter warn on every call; the report carries DEPRECATION_NOTE once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(torch.jit.script|Lite Interpreter|torch.jit.trace).*deprecated.*")
        yield


def to_torchscript(qmodel: nn.Module, resolution: int, *, engine: str | None = None) -> tuple[torch.jit.ScriptModule, str]:
    """Script ``qmodel`` (eval); where scripting fails, trace it on a batch-1 input. ``how`` says which."""
    engine = engine or eager.engine_of(qmodel)
    qmodel = qmodel.eval()
    with eager.quantized_engine(engine), torch.no_grad(), quiet_deprecations():
        try:
            return torch.jit.script(qmodel).eval(), "script"
        except Exception as exc:  # TorchScript raises several error types for unsupported Python
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        try:
            traced = torch.jit.trace(qmodel, torch.zeros(1, 3, resolution, resolution))
        except Exception as exc:
            raise ExportError(f"TorchScript failed for {type(qmodel).__name__}: script ({reason}) and trace "
                              f"({type(exc).__name__}: {str(exc)[:200]}); the INT8 model must be scriptable or "
                              f"traceable") from exc
    return traced.eval(), f"trace (torch.jit.script failed: {reason})"


def write_pt(sm: torch.jit.ScriptModule, path: Path | str) -> Path:
    """Save for the full TorchScript runtime (``torch.jit.load``), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        sm.save(str(tmp))
    return path


def write_ptl(sm: torch.jit.ScriptModule, path: Path | str) -> Path:
    """Save for the lite interpreter (``_load_for_lite_interpreter``, the PyTorch Mobile runtime), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, quiet_deprecations():
        save_for_lite_interpreter(sm, str(tmp))
    return path


def try_optimize_for_mobile(sm: torch.jit.ScriptModule) -> tuple[torch.jit.ScriptModule, str | None]:
    """``optimize_for_mobile(sm)``, or ``sm`` unchanged plus a warning that names why it was not applied."""
    from torch.utils.mobile_optimizer import optimize_for_mobile

    try:
        return optimize_for_mobile(sm), None
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        reason = re.sub(r"^.*please report a bug to PyTorch\.\s*", "", lines[0])[:200] if lines else ""
        return sm, (f"optimize_for_mobile was not applied ({type(exc).__name__}: {reason}); the .ptl holds the "
                    f"plain scripted INT8 model, which the lite interpreter runs as is; a PyTorch build with "
                    f"XNNPACK enabled is needed for the mobile optimization passes")
