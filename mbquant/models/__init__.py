"""The models: the zoo (``zoo``: architectures and costs; ``mobilenet_v1``: mbquant's own V1), what travels with a
model (``info``), checkpoints (``checkpoint``), torchvision's pretrained weights (``hub``) and name + weights ->
model (``load``). Names are imported on first use (PEP 562): ``ModelInfo`` stays torch-free."""
from __future__ import annotations

import importlib
from typing import Any

_API = {
    "ModelInfo": "info", "MODEL_NAMES": "info", "MAX_CLASSES": "info", "MAX_WIDTH_MULT": "info",
    "MobileNetV1": "mobilenet_v1",
    "ZOO": "zoo", "available_models": "zoo", "build": "zoo", "count_macs": "zoo", "count_params": "zoo",
    "entry": "zoo", "rho_for": "zoo",
    "CHECKPOINT_FORMAT": "checkpoint", "check_finite": "checkpoint", "file_sha256": "checkpoint",
    "load_checkpoint": "checkpoint", "read_checkpoint_info": "checkpoint", "save_checkpoint": "checkpoint",
    "create": "load", "create_with_info": "load", "resolve_model": "load",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'mbquant.models' has no attribute '{name}'")
