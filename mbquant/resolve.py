"""Turn what the user typed (model name + --weights) into a float model and its metadata."""
from __future__ import annotations

from .checkpoints import default_for
from .errors import ModelError
from .models import ModelInfo, _entry, create_with_info


def resolve_model(name: str, weights: str | None, *, width_mult: float | None = None,
                  num_classes: int | None = None, preset: str | None = None,
                  resolution: int | None = None) -> tuple["object", ModelInfo]:
    """``weights=None`` selects the checkpoint shipped for ``name``; an error if there is none. ``width_mult`` and
    ``num_classes`` describe a plain state dict (mbquant checkpoints carry their own)."""
    _entry(name)  # an unknown model name is an error before anything else
    if weights is None:
        weights = default_for(name)
        if weights is None:
            raise ModelError(f"no shipped checkpoint for '{name}'; pass --weights (a checkpoint from "
                             f"`mbquant train`, or a torchvision weights name such as IMAGENET1K_V1)")
    extra = {k: v for k, v in (("width_mult", width_mult), ("num_classes", num_classes)) if v is not None}
    if preset is not None or resolution is not None:
        from .data import make_preset

        extra["preset"] = make_preset(preset or "imagenet", resolution)
        if name == "mobilenet_v1" and resolution:
            extra["rho"] = resolution / 224
    model, info = create_with_info(name, weights=weights, **extra)
    given = [f"--{k.replace('_', '-')}" for k in extra if k != "rho"]
    if given and info.weights_sha256 and _carries_its_own(info):
        raise ModelError(f"{', '.join(given)} describe a plain state dict, but '{info.weights}' is an mbquant "
                         f"checkpoint that carries its own width, classes and preprocessing; drop {', '.join(given)}")
    return model, info


def _carries_its_own(info: ModelInfo) -> bool:
    from .models import read_checkpoint_info

    return "format" in read_checkpoint_info(info.weights)
