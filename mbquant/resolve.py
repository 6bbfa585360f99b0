"""Turn what the user typed (model name + --weights) into a float model and its metadata."""
from __future__ import annotations

from .checkpoints import default_for
from .errors import ModelError
from .models import ModelInfo, _entry, create_with_info


def resolve_model(name: str, weights: str | None) -> tuple["object", ModelInfo]:
    """``weights=None`` selects the checkpoint shipped for ``name``; an error if there is none."""
    _entry(name)  # an unknown model name is an error before anything else
    if weights is None:
        weights = default_for(name)
        if weights is None:
            raise ModelError(f"no shipped checkpoint for '{name}'; pass --weights (a checkpoint from "
                             f"`mbquant train`, or a torchvision weights name such as IMAGENET1K_V1)")
    return create_with_info(name, weights=weights)
