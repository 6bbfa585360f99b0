"""Name + weights -> a float model and its :class:`~mbquant.models.info.ModelInfo`.

``weights`` is an mbquant checkpoint or plain state dict (a path; loaded with ``weights_only=True``), torchvision's
own weight file (recognised by its published name), the name of a checkpoint shipped with mbquant
(:mod:`mbquant.checkpoints`), or a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``).
:func:`resolve_model` is what the command line means by ``MODEL --weights W``: no weights selects the checkpoint
shipped for the model, and ``--width-mult``/``--num-classes``/``--preset``/``--resolution`` describe a plain state
dict only.
"""
from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from ..data.presets import Preset, imagenet_preset, make_preset
from ..errors import ModelError
from .checkpoint import load_checkpoint, read_checkpoint_info
from .info import MAX_CLASSES, MAX_WIDTH_MULT, ModelInfo
from .zoo import ZOO, entry, rho_for

WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def create(name: str, *, num_classes: int = 1000, width_mult: float = 1.0, weights: str | Path | None = None,
           rho: float = 1.0) -> nn.Module:
    """Build a zoo model in float, optionally loading ``weights`` (see the module doc)."""
    return create_with_info(name, num_classes=num_classes, width_mult=width_mult, weights=weights, rho=rho)[0]


def create_with_info(name: str, *, num_classes: int | None = None, width_mult: float = 1.0,
                     weights: str | Path | None = None, rho: float = 1.0,
                     preset: Preset | None = None) -> tuple[nn.Module, ModelInfo]:
    """``num_classes`` None: 1000 for a new model, read from the classifier of a plain state dict. ``preset``: how
    a plain state dict's model was fed (default: ImageNet's at the model's resolution); mbquant checkpoints and
    torchvision's weights carry their own."""
    zoo = entry(name)
    guess = num_classes is None
    num_classes = 1000 if guess else num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise ModelError(f"num_classes={num_classes!r} is invalid; pass the number of classes of your dataset "
                         f"(1..{MAX_CLASSES}, --num-classes)")
    if not (isinstance(width_mult, (int, float)) and math.isfinite(width_mult) and 0 < width_mult <= MAX_WIDTH_MULT):
        raise ModelError(f"width_mult={width_mult!r} is invalid; pass a width multiplier in (0, {MAX_WIDTH_MULT}] "
                         f"(--width-mult, e.g. 0.35, 0.5, 1.0)")
    if not zoo.has_width and width_mult != 1.0:
        raise ModelError(f"model '{name}' has no width multiplier (got width_mult={width_mult}); "
                         f"leave it at 1.0 or pick one of: {', '.join(n for n, e in ZOO.items() if e.has_width)}")
    if weights is None:
        model = zoo.build(num_classes=num_classes, width_mult=width_mult, rho=rho)
        res = getattr(model, "default_resolution", 224)
        return model.eval(), ModelInfo(name, num_classes, width_mult, imagenet_preset(res))
    from ..checkpoints import resolve_shipped

    shipped = resolve_shipped(str(weights))
    if shipped is not None:
        return load_checkpoint(shipped, expect_name=name)
    path = Path(weights)
    if path.suffix in WEIGHT_SUFFIXES or path.exists():
        return load_checkpoint(path, expect_name=name, num_classes=None if guess else num_classes,
                               width_mult=width_mult, rho=rho, preset=preset)
    from .hub import load_named

    return load_named(name, zoo.torchvision_name, str(weights), num_classes, width_mult)  # 1000 unless given


def resolve_model(name: str, weights: str | None, *, width_mult: float | None = None,
                  num_classes: int | None = None, preset: str | None = None,
                  resolution: int | None = None) -> tuple[nn.Module, ModelInfo]:
    """``weights=None`` selects the checkpoint shipped for ``name``; an error if there is none. ``width_mult``,
    ``num_classes``, ``preset`` and ``resolution`` describe a plain state dict (mbquant checkpoints and torchvision's
    weights carry their own)."""
    from ..checkpoints import default_for

    entry(name)  # an unknown model name is an error before anything else
    if weights is None:
        weights = default_for(name)
        if weights is None:
            raise ModelError(f"no shipped checkpoint for '{name}'; pass --weights (a checkpoint from "
                             f"`mbquant train`, or a torchvision weights name such as IMAGENET1K_V1)")
    extra: dict = {k: v for k, v in (("width_mult", width_mult), ("num_classes", num_classes)) if v is not None}
    if preset is not None or resolution is not None:
        extra["preset"] = make_preset(preset or "imagenet", resolution)
        if resolution:
            extra["rho"] = rho_for(name, resolution)
    model, info = create_with_info(name, weights=weights, **extra)
    given = [f"--{k.replace('_', '-')}" for k in extra if k != "rho"]
    if given and info.weights_sha256 and _carries_its_own(info):
        raise ModelError(f"{', '.join(given)} describe a plain state dict, but '{info.weights}' carries its own "
                         f"width, classes and preprocessing (an mbquant checkpoint or torchvision's weight file); "
                         f"drop {', '.join(given)}")
    return model, info


def _carries_its_own(info: ModelInfo) -> bool:
    from .hub import weights_for_file

    path = Path(info.weights)
    return "format" in read_checkpoint_info(path) or weights_for_file(entry(info.name).torchvision_name,
                                                                      path) is not None
