"""TorchScript artifacts (.pt for the full JIT, .ptl for the lite interpreter) from the eager INT8 model.

``export_torchscript`` is the whole job: quantize with :mod:`mbquant.quant.eager` (or take an already
quantized eager model, e.g. from eager QAT), script it, write both files atomically with sidecar JSON, then
measure: float vs INT8 accuracy on the evaluation images, parity of each file reloaded in a fresh Python
process (the lite interpreter for .ptl) against the in-process INT8 model, sizes and host latency.

``torch.utils.mobile_optimizer.optimize_for_mobile`` needs a PyTorch build with XNNPACK; where it fails
(this build: "XNNPACK is not enabled") the .ptl is the plain scripted model and a warning says so.

Quantized weights are re-packed for the quantized engine that is current when a file is loaded: set the
engine (qnnpack for the phone target) before ``torch.jit.load`` / ``_load_for_lite_interpreter``, as
:func:`reload_outputs` does in its fresh process; loaded under x86 the same file computes different logits.
"""
from __future__ import annotations

import contextlib
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .._io import atomic_path, ensure_writable_dir, write_json
from ..calibrate import CalibrationSet
from ..config import QuantConfig
from ..data import ImageFolderDataset, make_loader
from ..errors import ExportError, VerificationError
from ..evaluate import compare
from ..models import ModelInfo
from ..quant import eager
from .runtime import latency_ms

RELOAD_CHUNK = 500  # images per input file handed to the fresh process
DEPRECATION_NOTE = ("TorchScript and the lite interpreter are deprecated upstream (PyTorch points to torch.export "
                    "and ExecuTorch); these artifacts are for apps that still load .pt/.ptl")


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """torch.jit.script and the lite interpreter warn on every call; the report carries DEPRECATION_NOTE once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(torch.jit.script|Lite Interpreter|torch.jit.trace).*deprecated.*")
        yield

_RELOAD_SCRIPT = r"""
import sys, torch
path, engine, lite, out_dir, files = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5:]
torch.set_num_threads(1)
torch.backends.quantized.engine = engine
if lite:
    from torch.jit.mobile import _load_for_lite_interpreter
    module = _load_for_lite_interpreter(path)
else:
    module = torch.jit.load(path, map_location="cpu").eval()
with torch.no_grad():
    for i, f in enumerate(files):
        x = torch.load(f, weights_only=True)
        torch.save(module(x).float().contiguous(), f"{out_dir}/out_{i:05d}.pt")
"""


def to_torchscript(qmodel: nn.Module, resolution: int, *, engine: str | None = None) -> tuple[torch.jit.ScriptModule, str]:
    """Script ``qmodel`` (eval); where scripting fails, trace it on a batch-1 input. ``how`` says which."""
    engine = engine or eager.engine_of(qmodel)
    qmodel = qmodel.eval()
    with eager.quantized_engine(engine), torch.no_grad(), _quiet_deprecations():
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
    with atomic_path(path) as tmp, _quiet_deprecations():
        sm._save_for_lite_interpreter(str(tmp))
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


def _reload_files(path: Path, files: list[Path], out_dir: Path, *, lite: bool, engine: str,
                  timeout_s: float = 1800) -> list[Path]:
    """Run each saved input file through the artifact in a fresh Python process; return the output files."""
    if not Path(path).exists():
        raise VerificationError(f"artifact '{path}' does not exist; write it before reloading it")
    cmd = [sys.executable, "-c", _RELOAD_SCRIPT, str(path), engine, "1" if lite else "0", str(out_dir),
           *map(str, files)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise VerificationError(f"reloading '{path}' in a fresh process took over {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
        runtime = "lite interpreter" if lite else "torch.jit.load"
        raise VerificationError(f"'{path}' failed in a fresh process ({runtime}, engine {engine}, exit "
                                f"{proc.returncode}):\n{tail}")
    outs = [Path(out_dir) / f"out_{i:05d}.pt" for i in range(len(files))]
    missing = [o for o in outs if not o.exists()]
    if missing:
        raise VerificationError(f"the fresh process reloading '{path}' wrote {len(outs) - len(missing)} of "
                                f"{len(outs)} outputs; stderr: {proc.stderr[-500:]}")
    return outs


def reload_outputs(path: Path | str, inputs: torch.Tensor, *, lite: bool, engine: str) -> torch.Tensor:
    """The logits of ``inputs`` from the artifact at ``path`` loaded in a fresh Python process
    (``torch.jit.load``, or the lite interpreter with ``lite``) with the quantized ``engine`` set there."""
    with tempfile.TemporaryDirectory(prefix="mbquant-reload-") as tmp:
        files = []
        for i, chunk in enumerate(inputs.split(RELOAD_CHUNK)):
            files.append(Path(tmp) / f"in_{i:05d}.pt")
            torch.save(chunk.contiguous().clone(), files[-1])
        outs = _reload_files(Path(path), files, Path(tmp), lite=lite, engine=engine)
        return torch.cat([torch.load(o, weights_only=True) for o in outs])


# --------------------------------------------------------------------------- the whole job

def _quantized_model(model: nn.Module, calib_set: CalibrationSet | None, config: QuantConfig, engine: str,
                     relu6: str, qmodel: nn.Module | None, progress: bool) -> tuple[nn.Module, dict | None]:
    """The eager INT8 model (made here, or the given one after checking it fits) and what calibration used."""
    if qmodel is not None:
        made_for, made_relu6 = eager.engine_of(qmodel), getattr(qmodel, "mbquant_relu6", None)
        if made_for != engine:
            raise ExportError(f"the given INT8 model was quantized for engine '{made_for}', not '{engine}'; "
                              f"quantize it for the target's engine ({engine})")
        if made_relu6 != relu6:
            raise ExportError(f"the given INT8 model handles ReLU6 as '{made_relu6}', not '{relu6}'; pass "
                              f"relu6='{made_relu6}' or quantize it again")
        return qmodel.eval(), None
    if calib_set is None:
        raise ExportError("export_torchscript needs calibration images (calib_set) or an already quantized qmodel")
    prepared = eager.prepare(model, config, engine, relu6=relu6)
    result = eager.calibrate(prepared, calib_set, config.batch_size, progress=progress)
    return eager.convert(prepared), {**calib_set.to_dict(), **result.to_dict()}


def _evaluate(model: nn.Module, qmodel: nn.Module, eval_set: ImageFolderDataset, engine: str, batch_size: int,
              tmp: Path, progress: bool) -> tuple[object, list[Path], list[torch.Tensor]]:
    """Float vs eager INT8 on every image; the images and INT8 logits are kept (files, list) for the parity runs."""
    files: list[Path] = []
    logits: list[torch.Tensor] = []

    def int8(x: torch.Tensor) -> torch.Tensor:
        files.append(tmp / f"in_{len(files):05d}.pt")
        torch.save(x.contiguous().clone(), files[-1])
        logits.append(qmodel(x).float())
        return logits[-1]

    model.eval()
    with eager.quantized_engine(engine):
        cmp = compare({"float": model, "int8": int8}, make_loader(eval_set, batch_size), progress=progress,
                      desc="evaluate float/int8 (eager)")
    if cmp.count == 0 or not cmp.labelled:
        raise VerificationError(f"no labelled, readable evaluation images among {len(eval_set)}; pass a labelled "
                                f"ImageFolder with readable images")
    return cmp, files, logits


def _parity(path: Path, files: list[Path], reference: list[torch.Tensor], *, lite: bool, engine: str,
            tmp: Path) -> dict:
    """Top-1 agreement (%) and max |logit diff| of the artifact reloaded in a fresh process vs the INT8 model."""
    out_dir = tmp / ("out_ptl" if lite else "out_pt")
    out_dir.mkdir()
    same = total = 0
    maxdiff = 0.0
    for out, ref in zip(_reload_files(path, files, out_dir, lite=lite, engine=engine), reference):
        got = torch.load(out, weights_only=True)
        if got.shape != ref.shape:
            raise VerificationError(f"'{path}' reloaded gives logits of shape {list(got.shape)}, the INT8 model "
                                    f"{list(ref.shape)}")
        same += int((got.argmax(1) == ref.argmax(1)).sum())
        total += len(ref)
        maxdiff = max(maxdiff, float((got - ref).abs().max()))
    return {"agreement": round(100.0 * same / total, 3), "max_abs_logit_diff": round(maxdiff, 6), "images": total,
            "runtime": "lite interpreter (_load_for_lite_interpreter)" if lite else "torch.jit.load",
            "process": "fresh"}


def _host_latency(sm: torch.jit.ScriptModule, x1: torch.Tensor, engine: str, runs: int) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with eager.quantized_engine(engine):
            lat = latency_ms(sm, x1, runs=runs)
    finally:
        torch.set_num_threads(previous)
    return {**lat, "threads": 1, "host": f"{platform.machine()} CPU of this host (not a phone)",
            "model": "in-process scripted INT8 (.pt contents)"}


def _sidecar(path: Path, fmt: str, info: ModelInfo, config: QuantConfig, common: dict) -> Path:
    from ..report import library_versions

    return write_json(Path(f"{path}.json"), {
        "artifact": path.name, "format": fmt, "model": info.to_dict(), "config": config.to_dict(), **common,
        "preset": info.preset.to_dict(), "classes": list(info.classes), "versions": library_versions()})


def export_torchscript(model: nn.Module, info: ModelInfo, calib_set: CalibrationSet | None,
                       eval_set: ImageFolderDataset, out_dir: Path | str, *, config: QuantConfig = QuantConfig(),
                       target: str = "phone", relu6: str = "clamp", eval_batch_size: int = 100,
                       latency_runs: int = 20, progress: bool = False, qmodel: nn.Module | None = None) -> dict:
    """Write ``<stem>_int8.pt`` and ``<stem>_int8.ptl`` (+ sidecar JSON) and measure them; returns the report
    section (JSON-serialisable). ``qmodel``: an already quantized eager model (e.g. from eager QAT)."""
    start = time.perf_counter()
    out_dir = ensure_writable_dir(Path(out_dir))
    engine = eager.engine_for(target)
    qmodel, calibration = _quantized_model(model, calib_set, config, engine, relu6, qmodel, progress)
    weights = eager.weight_granularity(qmodel)
    sm, how = to_torchscript(qmodel, info.resolution, engine=engine)
    mobile, opt_warning = try_optimize_for_mobile(sm)
    warns = [DEPRECATION_NOTE] + ([opt_warning] if opt_warning else [])
    if how != "script":
        warns.append(f"the INT8 model was traced, not scripted: {how}")
    if weights.granularity != config.granularity:
        warns.append(f"the INT8 weights are {weights.granularity}, the config asked for {config.granularity}")
    stem = f"{info.name}_w{info.width_mult:g}_r{info.resolution}_int8"
    pt, ptl = write_pt(sm, out_dir / f"{stem}.pt"), write_ptl(mobile, out_dir / f"{stem}.ptl")
    common = {"engine": engine, "target": target, "granularity": weights.to_dict(), "relu6": relu6,
              "script_method": how, "optimize_for_mobile": opt_warning is None, "calibration": calibration}
    _sidecar(pt, "torchscript (torch.jit.load)", info, config, common)
    _sidecar(ptl, "torchscript lite (torch.jit.mobile._load_for_lite_interpreter)", info, config, common)
    with tempfile.TemporaryDirectory(prefix="mbquant-ts-") as tmp:
        cmp, files, logits = _evaluate(model, qmodel, eval_set, engine, eval_batch_size, Path(tmp), progress)
        parity = {"pt": _parity(pt, files, logits, lite=False, engine=engine, tmp=Path(tmp)),
                  "ptl": _parity(ptl, files, logits, lite=True, engine=engine, tmp=Path(tmp))}
        x1 = torch.load(files[0], weights_only=True)[:1]
    if cmp.skipped:
        warns.append(f"{cmp.skipped} unreadable evaluation images were skipped")
    accuracy = {"images": cmp.count, "float_top1": round(cmp.accuracy["float"].top1, 3),
                "int8_top1": round(cmp.accuracy["int8"].top1, 3), "top1_drop_pp": round(cmp.drop("float", "int8"), 3),
                "agreement_float_vs_int8": round(cmp.agree("float", "int8"), 3),
                "float_top5": round(cmp.accuracy["float"].top5, 3), "int8_top5": round(cmp.accuracy["int8"].top5, 3)}
    return {"artifacts": {"pt": {"path": str(pt), "bytes": pt.stat().st_size},
                          "ptl": {"path": str(ptl), "bytes": ptl.stat().st_size}},
            "accuracy": accuracy, "parity": parity, "latency": _host_latency(sm, x1, engine, latency_runs),
            "engine": engine, "target": target, "granularity": weights.granularity, "weights": weights.to_dict(),
            "relu6": relu6, "script_method": how, "calibration": calibration, "warnings": warns,
            "seconds": round(time.perf_counter() - start, 1)}
