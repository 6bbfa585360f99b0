"""torchvision's pretrained weights: by enum name (``IMAGENET1K_V1``, ``DEFAULT``; loaded through torchvision's own
API, which downloads into the hub cache) or, offline, the weight file itself (``mobilenet_v2-b0353104.pth``, e.g.
from the hub cache), recognised by its name. Either way the model is fed as those weights were trained: resize,
centre crop, mean and std come from the weights' own transforms, and the class names from their metadata."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.presets import imagenet_preset
from ..errors import ModelError
from .info import ModelInfo


def _enum(torchvision_name: str):
    import torchvision

    return torchvision.models.get_model_weights(torchvision_name)


def _info(name: str, w: Any, weights: str, sha256: str | None = None) -> ModelInfo:
    t = w.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    preset = imagenet_preset(crop, resize=resize, mean=tuple(t.mean), std=tuple(t.std))
    cats = tuple(w.meta["categories"])
    return ModelInfo(name, len(cats), 1.0, preset, cats, weights=weights, weights_sha256=sha256)


def weights_for_file(torchvision_name: str | None, path: Path) -> Any | None:
    """The torchvision weights entry whose published file has ``path``'s name, or None."""
    if torchvision_name is None:
        return None
    return next((w for w in _enum(torchvision_name) if Path(w.url).name == path.name), None)


def model_for_file(name: str, torchvision_name: str, w: Any, path: str, sha256: str) -> tuple[nn.Module, ModelInfo]:
    """The architecture and metadata of torchvision's weight file ``path`` (the caller loads the state into it)."""
    import torchvision

    model = torchvision.models.get_model(torchvision_name, weights=None, num_classes=len(w.meta["categories"]))
    return model, _info(name, w, path, sha256)


def load_named(name: str, torchvision_name: str | None, wname: str, num_classes: int,
               width_mult: float) -> tuple[nn.Module, ModelInfo]:
    """torchvision weights by enum name, downloaded into (or read from) the hub cache."""
    import torchvision

    from ..checkpoints import shipped_names

    if torchvision_name is None:
        close = difflib.get_close_matches(wname, shipped_names(), n=2, cutoff=0.6)
        raise ModelError(f"--weights '{wname}' is not a file or a shipped checkpoint, and model '{name}' has no "
                         f"torchvision weights; {'did you mean ' + ' or '.join(close) + '? ' if close else ''}shipped: "
                         f"{', '.join(shipped_names())}; or a checkpoint written by `mbquant train`")
    enum = _enum(torchvision_name)
    try:
        w = enum.DEFAULT if wname == "DEFAULT" else enum[wname]
    except KeyError:
        known = [*shipped_names(), "DEFAULT", *(m.name for m in enum)]
        close = difflib.get_close_matches(wname, known, n=2, cutoff=0.6)
        raise ModelError(f"--weights '{wname}' is not a file, a shipped checkpoint or a torchvision weights name for "
                         f"{name}; {'did you mean ' + ' or '.join(close) + '? ' if close else ''}shipped: "
                         f"{', '.join(shipped_names())}; torchvision: DEFAULT, {', '.join(m.name for m in enum)}; "
                         f"or a path to a .pth file") from None
    if width_mult != 1.0:
        raise ModelError(f"torchvision weights {w} exist only for width_mult=1.0 (got {width_mult}); "
                         f"train your own with `mbquant train`")
    n = len(w.meta["categories"])
    if num_classes not in (n, 1000):
        raise ModelError(f"{w} has {n} classes but num_classes={num_classes}; pass num_classes={n} and fine-tune after")
    try:
        model = torchvision.models.get_model(torchvision_name, weights=w)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        raise ModelError(f"could not load torchvision weights {w} ({type(exc).__name__}: {str(exc)[:200]}); offline, "
                         f"pass the weight file itself (--weights {hub.name}, downloaded from {w.url}) or place it at "
                         f"{hub}") from exc
    return model.eval(), _info(name, w, str(w))
