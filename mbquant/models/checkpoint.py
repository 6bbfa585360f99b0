"""mbquant checkpoints (``mbquant-checkpoint/1``: weights plus everything needed to rebuild and feed the model) and
plain state dicts: read with ``torch.load(..., weights_only=True)`` (never unpickling code), validated by schema
(keys, types, sane width and class count, finite weights) with messages that name the key, and written atomically."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.presets import Preset, imagenet_preset
from ..errors import ModelError
from .info import MAX_CLASSES, MAX_WIDTH_MULT, ModelInfo
from .zoo import entry

CHECKPOINT_FORMAT = "mbquant-checkpoint/1"


def file_sha256(path: Path | str) -> str:
    from ..atomic import sha256_file

    return sha256_file(path)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _read_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise ModelError(f"weights file '{path}' does not exist; pass a checkpoint written by `mbquant train`, a shipped "
                         f"checkpoint name or a torchvision weights name (IMAGENET1K_V1, DEFAULT)")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a pipe or device?)"
        raise ModelError(f"weights file '{path}' is {kind}; pass the path of a checkpoint file (.pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsafe globals
        text = _ANSI.sub("", str(exc))
        if "Weights only load failed" in text or "Unsupported global" in text:
            raise ModelError(f"weights file '{path}' holds pickled Python objects (a whole model?), which mbquant does not "
                             f"load because unpickling can run code; save `model.state_dict()` (or use `mbquant train`) "
                             f"and pass that file") from exc
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        raise ModelError(f"cannot read weights file '{path}' ({type(exc).__name__}: {first}); pass a checkpoint saved "
                         f"with torch.save (a state dict or `mbquant train` output)") from exc
    if not isinstance(obj, dict):
        raise ModelError(f"weights file '{path}' holds a {type(obj).__name__}, not a state dict; "
                         f"save `model.state_dict()` rather than the model object")
    return obj


def _require(ck: dict, path: Path, key: str, kinds: tuple[type, ...], what: str) -> Any:
    if key not in ck:
        raise ModelError(f"checkpoint '{path}' lacks '{key}' ({what}); it was not written by `mbquant train`: pass "
                         f"the file to --weights as a plain state dict with --width-mult and --num-classes, or retrain")
    value = ck[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ModelError(f"checkpoint '{path}': '{key}' is {value!r} ({type(value).__name__}), expected {what}; fix or "
                         f"rewrite the checkpoint with `mbquant train`")
    return value


def _check_mbquant_checkpoint(ck: dict, path: Path) -> None:
    """Schema of an mbquant checkpoint: every key present, of its type, in a sane range (before building)."""
    name = _require(ck, path, "model", (str,), "a zoo model name")
    entry(name)
    n = _require(ck, path, "num_classes", (int,), f"a number of classes in [1, {MAX_CLASSES}]")
    w = _require(ck, path, "width_mult", (int, float), f"a width multiplier in (0, {MAX_WIDTH_MULT}]")
    rho = ck.get("rho", 1.0)
    if not 1 <= n <= MAX_CLASSES:
        raise ModelError(f"checkpoint '{path}': num_classes {n} is out of range [1, {MAX_CLASSES}]; the file is damaged")
    if not (isinstance(w, (int, float)) and math.isfinite(w) and 0 < w <= MAX_WIDTH_MULT):
        raise ModelError(f"checkpoint '{path}': width_mult {w} is out of range (0, {MAX_WIDTH_MULT}]; the file is "
                         f"damaged")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and 0 < rho <= 1):
        raise ModelError(f"checkpoint '{path}': rho {rho!r} is out of range (0, 1]; the file is damaged")
    _require(ck, path, "preset", (dict,), "the preprocessing preset (a dict)")
    classes = ck.get("classes", [])
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes) \
            or len(classes) not in (0, n):
        raise ModelError(f"checkpoint '{path}': 'classes' must be a list of {n} class names, got {str(classes)[:80]}")
    state = _require(ck, path, "state_dict", (dict,), "the weights (a state dict)")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint '{path}': 'state_dict' holds non-tensor values; the file is damaged")


def _preset_of(ck: dict, path: Path) -> Preset:
    from dataclasses import fields

    d = ck["preset"]
    unknown = sorted(set(d) - {f.name for f in fields(Preset)})
    if unknown:
        raise ModelError(f"checkpoint '{path}': preset has unknown keys {unknown}; known: "
                         f"{sorted(f.name for f in fields(Preset))}; fix the file or retrain")
    try:
        return Preset.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"checkpoint '{path}': preset {d} is invalid ({exc}); fix the file or retrain") from exc


def check_finite(state: dict, path: Path) -> None:
    """Weights with NaN or infinity give meaningless outputs (10 % top-1 on 10 classes) without any error."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ModelError(f"weights '{path}' hold non-finite values in '{k}' ({bad} of {v.numel()}); the training "
                             f"diverged or the file is damaged: retrain (e.g. with a lower --lr) or use another checkpoint")


def read_checkpoint_info(path: Path | str) -> dict:
    """The metadata of an mbquant checkpoint (without building the model)."""
    ck = _read_checkpoint(Path(path))
    return {k: v for k, v in ck.items() if k != "state_dict"}


def load_checkpoint(path: Path | str, *, expect_name: str | None = None, num_classes: int | None = None,
                    width_mult: float = 1.0, rho: float = 1.0,
                    preset: Preset | None = None) -> tuple[nn.Module, ModelInfo]:
    """Rebuild a model from a checkpoint. mbquant checkpoints carry their own architecture and preset;
    a plain state dict needs ``expect_name``/``num_classes``/``width_mult``."""
    path = Path(path)
    ck = _read_checkpoint(path)
    digest = file_sha256(path)
    if ck.get("format") == CHECKPOINT_FORMAT:
        _check_mbquant_checkpoint(ck, path)
        name = ck["model"]
        if expect_name is not None and name != expect_name:
            raise ModelError(f"checkpoint '{path}' holds a {name}, not a {expect_name}; "
                             f"run `mbquant ... {name}` or pass {expect_name} weights")
        model = entry(name).build(num_classes=ck["num_classes"], width_mult=ck["width_mult"], rho=ck.get("rho", 1.0))
        info = ModelInfo(name, ck["num_classes"], ck["width_mult"], _preset_of(ck, path),
                         tuple(ck.get("classes", ())), weights=str(path), weights_sha256=digest)
        state = ck["state_dict"]
    else:
        if expect_name is None:
            raise ModelError(f"'{path}' is a plain state dict; name the model it belongs to")
        state = ck.get("state_dict", ck) if isinstance(ck.get("state_dict"), dict) else ck
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"'{path}' is neither an mbquant checkpoint nor a state dict of tensors; pass a checkpoint "
                             f"written by `mbquant train` or torch.save(model.state_dict())")
        from .hub import model_for_file, weights_for_file

        tv_name = entry(expect_name).torchvision_name
        published = weights_for_file(tv_name, path)
        if published is not None:      # torchvision's own file: its classes and preprocessing come with it
            model, info = model_for_file(expect_name, tv_name, published, str(path), digest)
        else:
            n = num_classes if num_classes is not None else _guess_num_classes(state)
            model = entry(expect_name).build(num_classes=n, width_mult=width_mult, rho=rho)
            res = getattr(model, "default_resolution", 224)
            info = ModelInfo(expect_name, n, width_mult, preset or imagenet_preset(res), weights=str(path),
                             weights_sha256=digest)
    check_finite(state, path)
    load_state(model, state, path, info)
    return model.eval(), info


def _guess_num_classes(state: dict) -> int:
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    return int(tensors[-1].shape[0]) if tensors else 1000


def load_state(model: nn.Module, state: dict, path: Path, info: ModelInfo) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    file_classes = _guess_num_classes(state)
    if not missing and not unexpected and wrong and file_classes != info.num_classes \
            and all(k.split(".")[0] == wrong[0][0].split(".")[0] for k, _, _ in wrong):
        raise ModelError(f"weights '{path}' were trained for {file_classes} classes but the model has "
                         f"{info.num_classes}; pass --num-classes {file_classes} (num_classes={file_classes} in Python)")
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k, got, want = wrong[0]
            detail.append(f"{len(wrong)} shape mismatches (first: {k} is {list(got)} in the file, {list(want)} in the model)")
        if missing:
            detail.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise ModelError(f"weights '{path}' do not fit {info.name} (width {info.width_mult:g}, {info.num_classes} "
                         f"classes): {'; '.join(detail)}; pass --width-mult and --num-classes as the weights were "
                         f"trained, or weights for this model")
    model.load_state_dict(state)


def save_checkpoint(model: nn.Module, info: ModelInfo, path: Path | str, *, recipe: dict | None = None,
                    metrics: dict | None = None, rho: float = 1.0) -> Path:
    """Write an mbquant checkpoint atomically (weights + everything needed to rebuild and feed the model)."""
    from .. import __version__
    from ..atomic import atomic_path

    ck = {"format": CHECKPOINT_FORMAT, "model": info.name, "num_classes": info.num_classes,
          "width_mult": info.width_mult, "rho": rho, "resolution": info.resolution, "preset": info.preset.to_dict(),
          "classes": list(info.classes), "recipe": recipe or {}, "metrics": metrics or {},
          "mbquant_version": __version__,
          "state_dict": {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}}
    with atomic_path(Path(path)) as tmp:
        torch.save(ck, tmp)
    return Path(path)
